"""torch.compile (inductor on the CPU): activation statistics equal the uncompiled twin's, with a bounded
number of compilations and no new graph breaks, counted with dynamo's own counters."""

from __future__ import annotations

import copy
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from _logger_helpers import at, close, read, recorded, unit_dead_fraction
from _tiny_gpt import TinyGPT
from torch import nn
from torch._dynamo.utils import counters
from torch.utils.tensorboard import SummaryWriter

from tb_diag_logger import Diagnostics
from tb_diag_logger.diagnostics import DiagnosticsWarning
from tb_diag_logger.reductions import SIGMOID_TAIL

STEPS, EVERY = 30, 5
LOGGED = list(range(0, STEPS, EVERY))
SITES = ["relu", "tanh", "sigmoid", "gelu"]


class _Net(nn.Module):
    """One activation module of each statistic family."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 12)
        self.relu = nn.ReLU()
        self.b = nn.Linear(12, 12)
        self.tanh = nn.Tanh()
        self.c = nn.Linear(12, 12)
        self.sigmoid = nn.Sigmoid()
        self.d = nn.Linear(12, 12)
        self.gelu = nn.GELU()
        self.out = nn.Linear(12, 3)

    def forward(self, x):
        x = self.relu(self.a(x))
        x = self.tanh(8 * self.b(x))
        x = self.sigmoid(10 * self.c(x))
        return self.out(self.gelu(self.d(x)))


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 6, generator=g) for _ in range(STEPS)]


def _fresh_dynamo() -> None:
    torch._dynamo.reset()
    counters.clear()


def _dynamo_counts() -> tuple[int, int]:
    """(graphs dynamo compiled, graph breaks) since the last `_fresh_dynamo()`."""
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def _train(model: nn.Module, logdir, counts_at: tuple[int, ...] = ()) -> dict[int, tuple[int, int]]:
    """STEPS SGD steps on `_batches()`, with Diagnostics(every=EVERY) when `logdir` is given.
    Returns the dynamo counts after each step in `counts_at`."""
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    writer = SummaryWriter(str(logdir)) if logdir is not None else None
    diag = Diagnostics(model, writer, every=EVERY, optimizer=opt) if writer is not None else None
    seen = {}
    for step, x in enumerate(_batches()):
        opt.zero_grad()
        model(x).square().mean().backward()
        if diag is not None:
            diag.step(step)
        opt.step()
        if step in counts_at:
            seen[step] = _dynamo_counts()
    if diag is not None:
        diag.close()
        writer.close()
    return seen


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same net trained three ways: compiled bare, compiled with Diagnostics, eager with Diagnostics."""
    torch.manual_seed(0)
    net = _Net()
    eager, bare, diagnosed = copy.deepcopy(net), copy.deepcopy(net), net
    _fresh_dynamo()
    bare_counts = _train(torch.compile(bare), None, counts_at=(STEPS - 1,))[STEPS - 1]
    _fresh_dynamo()
    compiled_dir = tmp_path_factory.mktemp("compiled")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        counts = _train(torch.compile(diagnosed), compiled_dir, counts_at=(EVERY + 1, STEPS - 1))
    eager_dir = tmp_path_factory.mktemp("eager")
    _train(eager, eager_dir)
    _fresh_dynamo()
    diag_warnings = [str(w.message) for w in record if issubclass(w.category, DiagnosticsWarning)]
    return read(compiled_dir), read(eager_dir), bare_counts, counts, diag_warnings


def test_compiled_activation_statistics_equal_the_uncompiled_twin(runs):
    compiled, eager, _, _, diag_warnings = runs
    assert diag_warnings == []
    for metric, layers in [("act_mean", SITES), ("act_std", SITES), ("dead_fraction", ["relu"]),
                           ("saturation", ["tanh", "sigmoid"])]:
        assert compiled[metric].steps.tolist() == LOGGED, metric
        assert sorted(compiled[metric].layers) == sorted(layers), metric
        for layer in layers:
            for step in LOGGED:
                got, want = at(compiled, metric, layer, step), at(eager, metric, layer, step)
                assert close(got, want, rel=1e-4, abs_=1e-5), (metric, layer, step, got, want)
    # The saturation statistics are not trivially zero, so the comparison above means something.
    assert at(eager, "saturation", "sigmoid", 0) > 0.1 and at(eager, "saturation", "tanh", 0) > 0.1


def test_compiled_statistics_match_a_hand_computation_at_the_first_step(runs):
    compiled = runs[0]
    torch.manual_seed(0)
    net = _Net()  # the weights every run started from
    outs = {}
    for name in SITES:
        getattr(net, name).register_forward_hook(lambda m, a, y, name=name: outs.__setitem__(name, y.detach()))
    with torch.no_grad():
        net(_batches()[0])
    relu = outs["relu"].numpy().astype(np.float64)
    assert close(at(compiled, "dead_fraction", "relu", 0), unit_dead_fraction(relu), rel=1e-6)
    for name in SITES:
        y = outs[name].numpy().astype(np.float64)
        assert close(at(compiled, "act_mean", name, 0), float(y.mean()), rel=1e-4, abs_=1e-6), name
        assert close(at(compiled, "act_std", name, 0), float(y.std(ddof=1)), rel=1e-4, abs_=1e-6), name
    sig = outs["sigmoid"].numpy().astype(np.float64)
    tail = float(np.mean([min(v, 1 - v) <= SIGMOID_TAIL for v in sig.ravel()]))
    assert close(at(compiled, "saturation", "sigmoid", 0), tail, rel=1e-6, abs_=1e-6)


def test_compiled_model_compiles_once_more_and_breaks_no_graph(runs):
    _, _, (bare_graphs, bare_breaks), counts, _ = runs
    # One graph for logged forwards and one without the reductions, however many steps run.
    assert counts[STEPS - 1] == counts[EVERY + 1]
    graphs, breaks = counts[STEPS - 1]
    assert breaks == bare_breaks == 0
    assert graphs == bare_graphs + 1


def test_steps_that_are_not_logged_record_nothing(runs):
    compiled = runs[0]
    for step in range(STEPS):
        assert recorded(compiled, "act_mean", "relu", step) == (step in LOGGED), step


# -- a nanoGPT-style model (nanoGPT's own MLP uses an nn.GELU module)


def _gpt_run(model, logdir, steps: int = 6, every: int = 5) -> list[str]:
    g = torch.Generator().manual_seed(2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with Diagnostics(model, logdir=str(logdir), every=every, optimizer=opt) as diag:
            for step in range(steps):
                idx = torch.randint(0, 32, (4, 8), generator=g)
                loss = model(idx, idx.roll(-1, dims=1))
                opt.zero_grad()
                loss.backward()
                diag.step(step, loss=loss)
                opt.step()
    return [str(w.message) for w in record if issubclass(w.category, DiagnosticsWarning)]


def test_a_compiled_nanogpt_style_model_gets_its_gelu_statistics(tmp_path):
    torch.manual_seed(0)
    gpt = TinyGPT(layers=1)  # inductor compiles fwd and bwd of two graphs: keep it small
    twin = copy.deepcopy(gpt)
    _fresh_dynamo()
    assert _gpt_run(torch.compile(gpt), tmp_path / "compiled") == []
    graphs, breaks = _dynamo_counts()
    _fresh_dynamo()
    assert _gpt_run(twin, tmp_path / "eager") == []
    compiled, eager = read(tmp_path / "compiled"), read(tmp_path / "eager")
    sites = ["h.0.mlp.gelu"]
    assert compiled["act_mean"].layers == sites and compiled["act_mean"].steps.tolist() == [0, 5]
    for metric in ("act_mean", "act_std"):
        for site in sites:
            for step in (0, 5):
                got, want = at(compiled, metric, site, step), at(eager, metric, site, step)
                assert close(got, want, rel=1e-3, abs_=1e-5), (metric, site, step, got, want)
    assert breaks == 0 and graphs <= 2
    assert math.isfinite(at(compiled, "loss", "total", 5))


def test_functional_gelu_in_a_compiled_model_is_not_captured_and_nothing_breaks(tmp_path):
    # What the README says: no module to hook, so no activation sites; no warning, no graph break.
    _fresh_dynamo()
    model = torch.compile(TinyGPT(functional=True), backend="eager")  # dynamo's graph breaks, without inductor
    assert _gpt_run(model, tmp_path) == []
    _, breaks = _dynamo_counts()
    _fresh_dynamo()
    s = read(tmp_path)
    assert breaks == 0
    assert "act_mean" not in s and s["grad_norm"].steps.tolist() == [0, 5]


def test_a_graph_compiled_before_diagnostics_is_reported(tmp_path, monkeypatch):
    _fresh_dynamo()
    # dynamo's default, as in a process where no Diagnostics of a compiled model was created yet
    monkeypatch.setattr(torch._dynamo.config, "skip_nnmodule_hook_guards", True)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    compiled = torch.compile(net, backend="eager")
    compiled(torch.randn(2, 6)).sum().backward()  # compiled without the hooks: dynamo will not see them
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with Diagnostics(compiled, logdir=str(tmp_path), every=1) as diag:
            for step in range(3):
                compiled(torch.randn(2, 6)).sum().backward()
                diag.step(step)
    _fresh_dynamo()
    messages = [str(w.message) for w in record if issubclass(w.category, DiagnosticsWarning)]
    assert len(messages) == 1 and "compiled before Diagnostics was created" in messages[0], messages


# -- the README's section, run verbatim


def _readme_snippet(marker: str) -> str:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    m = re.search(re.escape(marker) + r"[^\n]*-->\s*```python\n(.*?)```", text, re.S)
    assert m, f"no python block after {marker} in README.md"
    return m.group(1)


def test_the_readme_compiled_models_snippet_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _fresh_dynamo()
    exec(compile(_readme_snippet("<!-- test:compiled-models"), "README.md", "exec"), {"__name__": "__readme__"})
    _fresh_dynamo()
    s = read(tmp_path / "runs" / "compiled")
    assert s["dead_fraction"].layers == ["1"] and s["act_mean"].steps.tolist() == [0, 10]


def test_batch_sizes_that_change_give_the_eager_statistics_without_graph_breaks(tmp_path):
    # A new batch size makes dynamo recompile with a dynamic batch dimension: the hooks' counts come from it.
    torch.manual_seed(0)
    net = _Net()
    twin = copy.deepcopy(net)
    _fresh_dynamo()
    compiled = torch.compile(net, backend="eager")  # dynamo's shape handling, without inductor's compile time
    for model, logdir in ((compiled, tmp_path / "compiled"), (twin, tmp_path / "eager")):
        g = torch.Generator().manual_seed(3)
        with Diagnostics(model, logdir=str(logdir), every=2) as diag:
            for step in range(8):
                model(torch.randn([3, 5, 7, 9][step % 4], 6, generator=g)).sum().backward()
                diag.step(step)
    graphs, breaks = _dynamo_counts()
    _fresh_dynamo()
    got, want = read(tmp_path / "compiled"), read(tmp_path / "eager")
    assert breaks == 0 and graphs <= 4
    for step in (0, 2, 4, 6):
        for metric, layer in [("act_mean", "gelu"), ("act_std", "tanh"), ("dead_fraction", "relu")]:
            assert close(at(got, metric, layer, step), at(want, metric, layer, step), rel=1e-5), (metric, step)


def test_gradient_accumulation_adds_one_graph_whatever_the_number_of_micro_batches(tmp_path):
    torch.manual_seed(0)
    net = _Net()
    twin = copy.deepcopy(net)
    _fresh_dynamo()
    compiled = torch.compile(net, backend="eager")
    for model, logdir in ((compiled, tmp_path / "compiled"), (twin, tmp_path / "eager")):
        g = torch.Generator().manual_seed(4)
        with Diagnostics(model, logdir=str(logdir), every=2) as diag:
            for step in range(6):
                for _ in range(5):  # micro-batches
                    model(torch.randn(4, 6, generator=g)).sum().backward()
                diag.step(step)
    graphs, breaks = _dynamo_counts()
    _fresh_dynamo()
    got, want = read(tmp_path / "compiled"), read(tmp_path / "eager")
    # not logged, logged first micro-batch, logged later micro-batches
    assert breaks == 0 and graphs == 3
    for step in (0, 2, 4):
        for metric, layer in [("act_mean", "sigmoid"), ("saturation", "tanh"), ("dead_fraction", "relu")]:
            assert close(at(got, metric, layer, step), at(want, metric, layer, step), rel=1e-5), (metric, step)


def test_another_instance_of_the_class_neither_reuses_nor_feeds_the_hooked_graph(tmp_path, monkeypatch):
    # Without hook guards, dynamo serves any instance of the class from the first graph it compiled:
    # b would run a's graph (no hooks), or a would run b's (its activations added to b's statistics).
    monkeypatch.setattr(torch._dynamo.config, "skip_nnmodule_hook_guards", True)
    _fresh_dynamo()
    torch.manual_seed(0)
    a, b = _Net(), _Net()
    twin = copy.deepcopy(b)
    x = torch.randn(4, 6)
    compiled_b = torch.compile(b, backend="eager")
    with Diagnostics(compiled_b, logdir=str(tmp_path / "compiled"), every=1) as diag:
        compiled_a = torch.compile(a, backend="eager")
        for step in range(3):
            compiled_a(5 * x).sum().backward()  # the bare instance runs first, armed
            compiled_b(x).sum().backward()
            diag.step(step)
    _fresh_dynamo()
    with Diagnostics(twin, logdir=str(tmp_path / "eager"), every=1) as diag:
        for step in range(3):
            twin(x).sum().backward()
            diag.step(step)
    got, want = read(tmp_path / "compiled"), read(tmp_path / "eager")
    for step in range(3):
        for layer in SITES:
            assert close(at(got, "act_mean", layer, step), at(want, "act_mean", layer, step), rel=1e-5), layer
        assert close(at(got, "dead_fraction", "relu", step), at(want, "dead_fraction", "relu", step))


def test_compiled_model_records_the_uncompiled_twins_logit_statistics(runs):
    """The output-logit statistics come from a hook on the compiled wrapper (no graph break, counted above)."""
    compiled, eager = runs[0], runs[1]
    for metric in ("logit_max_abs", "logit_lse"):
        assert compiled[metric].steps.tolist() == LOGGED, metric
        assert compiled[metric].layers == eager[metric].layers, metric
        layer = eager[metric].layers[0]
        for step in LOGGED:
            got, want = at(compiled, metric, layer, step), at(eager, metric, layer, step)
            assert close(got, want, rel=1e-4, abs_=1e-5), (metric, step, got, want)


def test_dynamos_hook_guard_setting_is_given_back_at_close(tmp_path, monkeypatch):
    """The capture turns dynamo's module-hook guards on while it exists; close() restores the setting."""
    monkeypatch.setattr(torch._dynamo.config, "skip_nnmodule_hook_guards", True)  # dynamo's default
    compiled = torch.compile(nn.Sequential(nn.Linear(6, 8), nn.ReLU()), backend="eager")
    diag = Diagnostics(compiled, logdir=str(tmp_path), every=1)
    assert torch._dynamo.config.skip_nnmodule_hook_guards is False
    diag.close()
    assert torch._dynamo.config.skip_nnmodule_hook_guards is True
