"""The plugin reads a run once TensorBoard has loaded it, before the tab asks (issue 4, Scale).

Every wait is on a condition or an event (what the plugin has read), never a sleep followed by an
assertion, and has no wall-clock bound of its own (pytest's timeout ends a hang).
"""

from __future__ import annotations

import numpy as np
import pytest
from _logger_helpers import train_small as _write
from torch.utils.tensorboard import SummaryWriter

from tb_diag_plugin import findings
from tb_diag_plugin.diagnostics_plugin import Config
from tb_diag_plugin.reading import LocalReader
from tb_diag_plugin.summary import EventWriter
from tbserver import serve_with_plugin, until


def _run(path, steps: range = range(40), seed: int = 0, dead: bool = False) -> None:
    writer = SummaryWriter(str(path))
    _write(writer, steps, seed, dead)
    writer.close()


def _metrics(plugin, run: str) -> set[str]:
    from tensorboard import context

    return set(plugin.store.index(context.RequestContext(), "")[run].tags)


@pytest.mark.parametrize("load_fast", [False, True], ids=["python_loader", "rust_data_server"])
def test_a_loaded_run_is_read_before_the_tab_asks(tmp_path, load_fast):
    """Once the run stops changing, every metric and the findings are in memory without a request
    from the tab; the findings the tab then gets are that cached answer, equal to an analysis of
    the event file."""
    _run(tmp_path / "r", dead=True)
    config = Config(preload_poll_s=0.2, preload_settle_poll_s=0.2)
    with serve_with_plugin(str(tmp_path), load_fast=load_fast, config=config) as (srv, plugin):
        until(lambda: "r" in plugin.preloader.preloaded_runs())
        assert plugin.read_ahead.thread is None, "something but the preload read the run"
        cached = {key[2] for key in plugin.store.series_cache.keys() if key[1] == "r"}
        assert cached == _metrics(plugin, "r") and len(cached) >= 8
        answers = len(plugin.store.findings_cache)
        assert answers == 1
        body = srv.plugin("findings?run=r")
        assert len(plugin.store.findings_cache) == answers, "the findings were computed again"
        expected, _ = findings.analyze(LocalReader(str(tmp_path)).series("r"))
        def facts(kind, severity, layers, first_step, last_step):
            return (kind, severity, tuple(layers), first_step, last_step)

        got = sorted(facts(*(f[k] for k in ("kind", "severity", "layers", "first_step", "last_step")))
                     for f in body["findings"])
        want = sorted(facts(f.kind, f.severity, f.layers, f.first_step, f.last_step) for f in expected)
        assert want and "dead_relu" in {w[0] for w in want}, want
        assert got == want


def test_the_preload_waits_for_a_run_to_settle_and_reads_it_again_when_it_grows(tmp_path):
    """A run is read once its data is unchanged between two looks, not while it changes, and again
    after it grew and settled; nothing is read twice for the same data."""
    writer = SummaryWriter(str(tmp_path / "live"))
    _write(writer, range(20))
    config = Config(index_ttl_s=0.0)  # every look lists the runs afresh: it sees the new steps at once
    with serve_with_plugin(str(tmp_path), extra=["--diagnostics_preload", "false"], config=config) as (srv, plugin):
        assert plugin.preloader.thread is None
        srv.wait_for_runs(1)
        seen: dict = {}
        assert plugin.preloader.look(seen) == 0  # first look: not yet known to be settled
        assert plugin.preloader.look(seen) == 1
        first = plugin.preloader.preloaded_runs()["live"]
        assert plugin.preloader.look(seen) == 0  # nothing new
        _write(writer, range(20, 30), seed=1)
        until(lambda: srv.plugin("values?run=live&metric=grad_norm")["num_steps"] == 30)
        assert plugin.preloader.look(seen) == 0, "a run was read while it was changing"
        assert plugin.preloader.look(seen) == 1
        assert plugin.preloader.preloaded_runs()["live"] != first
        answer = srv.plugin("findings?run=live")
        assert answer["run"] == "live"
    writer.close()


def _synthetic(path, wall_time: float) -> None:
    """A small run whose events carry `wall_time` (what "newest" means to the preload)."""
    with EventWriter(str(path)) as w:
        for step in range(10):
            w.write_vectors(step, [("loss", ["total"], (), np.array([1.0 / (step + 1)], np.float32)),
                                   ("grad_norm", ["a.weight", "a.bias"], (), np.array([1.0, 0.5], np.float32))],
                            wall_time=wall_time + step)


def test_the_preload_reads_the_newest_runs_first_and_stops_at_its_budget(tmp_path):
    _synthetic(tmp_path / "newer", wall_time=2e9)  # written first, newer by its events' wall times
    _synthetic(tmp_path / "older", wall_time=1e9)
    config = Config(preload_bytes=1)
    with serve_with_plugin(str(tmp_path), extra=["--diagnostics_preload", "false"], config=config) as (srv, plugin):
        srv.wait_for_runs(2)
        seen: dict = {}
        plugin.preloader.look(seen)
        assert plugin.preloader.look(seen) == 1
        assert set(plugin.preloader.preloaded_runs()) == {"newer"}
        assert plugin.store.series_cache.size > 0
        assert {key[1] for key in plugin.store.series_cache.keys()} == {"newer"}


def test_preload_off_reads_nothing_until_asked(tmp_path):
    """With the preload off no thread of the plugin that reads runs exists until the tab asks (so nothing
    can be read behind its back, whatever the wait), and the tab's first request is what starts one."""
    _run(tmp_path / "r")
    config = Config(preload_poll_s=0.1, preload_settle_poll_s=0.1)
    with serve_with_plugin(str(tmp_path), extra=["--diagnostics_preload", "false"], config=config) as (srv, plugin):
        srv.wait_for_runs(1)
        assert plugin.preloader.thread is None and plugin.read_ahead.thread is None
        assert len(plugin.store.series_cache) == 0 and len(plugin.store.findings_cache) == 0
        assert not plugin.preloader.preloaded_runs()
        srv.plugin("tags?run=r")  # the tab opens the run
        assert plugin.read_ahead.thread is not None and plugin.preloader.thread is None
        until(lambda: len(plugin.store.findings_cache) == 1)


def test_a_run_that_fails_to_read_does_not_stop_the_others(tmp_path):
    """One unreadable run costs only itself: the others are preloaded, the look does not raise, and the
    failed run is not read again until its data changes (no retry loop)."""
    _run(tmp_path / "bad", seed=1)
    _run(tmp_path / "good", seed=2)
    with serve_with_plugin(str(tmp_path), extra=["--diagnostics_preload", "false"]) as (srv, plugin):
        srv.wait_for_runs(2)
        tried = []
        read = plugin.preloader.read_run

        def failing_for_bad(ctx, eid, run, idx):
            tried.append(run)
            if run == "bad":
                raise RuntimeError("unreadable")
            return read(ctx, eid, run, idx)

        plugin.preloader.read_run = failing_for_bad
        seen: dict = {}
        plugin.preloader.look(seen)
        assert plugin.preloader.look(seen) == 1
        assert sorted(tried) == ["bad", "good"] and "good" in plugin.preloader.preloaded_runs()
        assert plugin.preloader.look(seen) == 0 and sorted(tried) == ["bad", "good"]


def test_background_reads_the_findings_inputs_then_the_findings_then_the_rest(tmp_path):
    """Event order, not time: the findings come right after the metrics their rules declare, are
    computed from those alone, every other metric is read after them, then each metric's step summary,
    then what the model view is made from."""
    from tensorboard import context

    from tb_diag_plugin.serving.background import read_whole_run

    _run(tmp_path / "r", dead=True)
    with serve_with_plugin(str(tmp_path), extra=["--diagnostics_preload", "false"]) as (srv, plugin):
        srv.wait_for_runs(1)
        store, ctx = plugin.store, context.RequestContext()
        idx = store.index(ctx, "")["r"]
        events: list[str] = []
        series, answer = store.series_and_key, store.findings  # every read of a metric goes through it

        def recording_series(ctx, eid, run, metric, idx):
            events.append(metric)
            return series(ctx, eid, run, metric, idx)

        def recording_findings(ctx, eid, run, idx):
            events.append("<findings>")
            out = answer(ctx, eid, run, idx)
            events.append("</findings>")
            return out

        summary = store.step_summary

        def recording_summary(ctx, eid, run, metric, idx):
            events.append("<summary>")
            return summary(ctx, eid, run, metric, idx)

        from tb_diag_plugin.serving import model_data

        warm = model_data.warm

        def recording_model(*args):
            events.append("<model>")
            return warm(*args)

        store.series_and_key, store.findings = recording_series, recording_findings
        store.step_summary = recording_summary
        model_data.warm = recording_model
        try:
            read_whole_run(store, ctx, "", "r", idx)
        finally:
            model_data.warm = warm
        start, end = events.index("<findings>"), events.index("</findings>")
        last = events.index("<summary>")  # then each metric's summary, from the series read before
        model = events.index("<model>")  # then what the model view is made from, last
        before, during, after = set(events[:start]), set(events[start + 1:end]), set(events[end + 1:last])
        inputs = set(idx.tags) & findings.INPUTS
        others = set(idx.tags) - findings.INPUTS
        assert inputs and others, (inputs, others)  # the run has both kinds
        assert before == inputs and during <= inputs and after == others
        summaries = events[last:model]
        assert summaries[::2] == ["<summary>"] * len(idx.tags) and set(summaries[1::2]) == set(idx.tags)
        assert set(events[model + 1:]) <= set(idx.tags)  # only reads of the run's own metrics after it
        assert len(store.summaries.keys()) == len(idx.tags)
        body = srv.plugin("findings?run=r")
        assert "dead_relu" in {f["kind"] for f in body["findings"]}


def test_read_order_puts_the_one_column_metrics_first():
    """The overview's loss, total norm and learning rate are cheap: the background reads them before any
    per-layer metric (a 500-layer one takes a data server hundreds of ms), then the rest by the contract."""
    from tb_diag_plugin import metadata
    from tb_diag_plugin.reading import RunIndex
    from tb_diag_plugin.serving.background import read_order

    recorded = list(metadata.ALL_METRICS)
    inputs, others = read_order(RunIndex(tags={m: [] for m in reversed(recorded)}))
    assert sorted(inputs + others) == sorted(recorded)
    assert set(inputs) == findings.INPUTS & set(recorded) and not set(others) & findings.INPUTS
    for part in (inputs, others):
        kinds = [metadata.METRICS[m].layer_kind for m in part]
        small = [i for i, k in enumerate(kinds) if k in ("loss", "model")]
        large = [i for i, k in enumerate(kinds) if k not in ("loss", "model")]
        assert not small or not large or max(small) < min(large), list(zip(part, kinds))
    assert inputs[0] == "loss"
