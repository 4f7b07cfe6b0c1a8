"""Each TensorBoard internal the plugin reads (reading/provider.py) gives what the public API gives,
under both loaders: where it applies it is used, elsewhere the public call answers."""

from __future__ import annotations

import contextlib
import time

import numpy as np
import pytest
from _logger_helpers import train_small
from tensorboard import context as tb_context
from tensorboard.plugins.core import core_plugin
from torch.utils.tensorboard import SummaryWriter

from tb_diag_plugin import reading
from tb_diag_plugin.diagnostics_plugin import DiagnosticsLoader
from tb_diag_plugin.reading import provider as tb_access
from tbserver import serve

STEPS = 12
# internal -> the loader it serves (True: --load_fast true, the Rust data server)
APPLIES_UNDER = {"multiplexer_listing": False, "multiplexer_tensors": False, "grpc_read_tensors": True}


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("internals")
    writer = SummaryWriter(str(root / "r"))
    train_small(writer, range(STEPS))
    writer.close()
    return root


@contextlib.contextmanager
def _loaded(logdir, load_fast: bool):
    """A real TensorBoard on `logdir` with every step loaded; yields its data provider."""
    made = []

    class Capturing(DiagnosticsLoader):
        def load(self, context):
            made.append(context.data_provider)
            plugin = super().load(context)
            made.append(plugin)
            return plugin

    with serve(str(logdir), load_fast=load_fast, plugins=[core_plugin.CorePluginLoader(), Capturing()],
               extra=["--diagnostics_preload", "false"]) as srv:
        srv.wait_for_runs(1, timeout=120)
        provider, ctx = made[0], tb_context.RequestContext()
        deadline = time.monotonic() + 60
        while not all(s[0] == STEPS - 1 for s in reading.index_runs(provider, ctx, "")["r"].stamps.values()):
            assert time.monotonic() < deadline, "the run never loaded"
            time.sleep(0.2)
        try:
            yield provider, ctx
        finally:
            made[1].close()


@pytest.mark.parametrize("load_fast", [False, True], ids=["python_loader", "rust_data_server"])
@pytest.mark.parametrize("internal", sorted(APPLIES_UNDER))
def test_an_internal_gives_what_the_public_api_gives(logdir, load_fast, internal):
    with _loaded(logdir, load_fast) as (provider, ctx):
        assert tb_access.applies(internal, provider) == (APPLIES_UNDER[internal] == load_fast)
        fast = reading.index_runs(provider, ctx, "", internals=(internal,))
        public = reading.index_runs(provider, ctx, "", internals=())
        assert sorted(fast) == sorted(public) == ["r"]
        a, b = fast["r"], public["r"]
        assert (a.tags, a.problems, a.structure_tag) == (b.tags, b.problems, b.structure_tag)
        assert {t: s[0] for t, s in a.stamps.items()} == {t: s[0] for t, s in b.stamps.items()}
        assert len(a.tags) >= 8
        for metric in b.tags:
            got, got_problems = reading.read_series(provider, ctx, "", "r", metric, b, reading.ALL_SAMPLES,
                                                    internals=(internal,))
            want, want_problems = reading.read_series(provider, ctx, "", "r", metric, b, reading.ALL_SAMPLES,
                                                      internals=())
            assert got_problems == want_problems == []
            assert got.layers == want.layers and got.steps.tolist() == list(range(STEPS)), metric
            np.testing.assert_array_equal(got.values, want.values)


def test_an_unknown_internal_is_refused():
    with pytest.raises(ValueError, match="name must be one of"):
        tb_access.applies("_index", object())
