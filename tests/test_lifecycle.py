"""The lifecycle around training, with `Diagnostics` attached: what users do to a model and its optimizer
mid-run (unfreeze, freeze, load a checkpoint, change dtype, replace the optimizer, DataParallel). Real
training loops; every recorded value is compared with one computed by hand in the loop."""

from __future__ import annotations

import glob
import json
import warnings

import pytest
import torch
from _logger_helpers import at, close, read, recorded
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from tb_diag_logger import Diagnostics
from tb_diag_logger.diagnostics import DiagnosticsWarning
from tb_diag_plugin import metadata
from tb_diag_plugin.findings import ModelInfo, analyze
from tb_diag_plugin.reading import LocalReader


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def _batch(step: int) -> torch.Tensor:
    return torch.randn(16, 4, generator=torch.Generator().manual_seed(step))


def _structures(logdir) -> dict[int, dict]:
    """Every structure document the run wrote, by step (the reader serves only the latest)."""
    out = {}
    for path in glob.glob(f"{logdir}/events.out.tfevents.*"):
        for event in EventFileLoader(path).Load():
            for v in event.summary.value:
                if v.tag == metadata.STRUCTURE_TAG:
                    out[event.step] = json.loads(v.tensor.string_val[0])
    return out


def _param_doc(doc: dict, name: str) -> dict:
    return next(p for m in doc["modules"] for p in m["params"] if p["name"] == name)


def _findings(logdir) -> set[str]:
    reader = LocalReader(str(logdir))
    found, _ = analyze(reader.series("."), model=ModelInfo.from_structure(reader.structure(".")))
    return {f.kind for f in found}


class _Recorder:
    """The values the loop computes by hand at each step: gradient and weight norms, and ‖Δw‖/‖w‖."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.grad: dict[int, dict[str, float]] = {}
        self.weight: dict[int, dict[str, float]] = {}
        self.ratio: dict[int, dict[str, float]] = {}
        self._before: dict[str, torch.Tensor] = {}

    def before_step(self, step: int) -> None:
        named = list(self.model.named_parameters())
        self.grad[step] = {n: p.grad.double().norm().item() for n, p in named if p.grad is not None}
        self.weight[step] = {n: p.double().norm().item() for n, p in named}
        self._before = {n: p.detach().double().clone() for n, p in named if p.grad is not None}

    def after_step(self, step: int) -> None:
        now = dict(self.model.named_parameters())
        self.ratio[step] = {
            n: (w - now[n].detach().double()).norm().item() / w.norm().item()
            for n, w in self._before.items()
            if not torch.equal(w, now[n].detach().double())
        }


def _check(series, rec: _Recorder, steps, rel: float = 1e-5) -> None:
    for step in steps:
        for name, want in rec.grad[step].items():
            assert close(at(series, "grad_norm", name, step), want, rel=rel), ("grad_norm", name, step)
        for name, want in rec.weight[step].items():
            assert close(at(series, "weight_norm", name, step), want, rel=rel), ("weight_norm", name, step)
        for name, want in rec.ratio.get(step, {}).items():
            assert close(at(series, "update_ratio", name, step), want, rel=1e-3), ("update_ratio", name, step)


def test_unfreezing_a_backbone_mid_run_adds_it_to_update_ratio_and_the_structure(tmp_path):
    """Progressive unfreezing: the backbone is frozen and left out of the optimizer, then from step 4
    `requires_grad_(True)` and `opt.add_param_group`; its tensors are measured from that logged step."""
    model = _model()
    backbone, head = model[0], model[2]
    backbone.requires_grad_(False)
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    rec = _Recorder(model)
    with SummaryWriter(tmp_path) as w, Diagnostics(model, w, every=1, optimizer=opt) as diag:
        for step in range(8):
            if step == 4:
                backbone.requires_grad_(True)
                opt.add_param_group({"params": backbone.parameters(), "lr": 0.05})
            loss = model(_batch(step)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            diag.step(step, loss=loss)
            rec.before_step(step)
            opt.step()
            rec.after_step(step)
    s = read(tmp_path)
    _check(s, rec, range(8))
    for step in range(4):
        assert not recorded(s, "update_ratio", "0.weight", step)
        assert at(s, "grad_missing", "0.weight", step) == 1.0
    for step in range(4, 8):
        assert at(s, "grad_missing", "0.weight", step) == 0.0
        assert rec.ratio[step]["0.weight"] > 0 and recorded(s, "update_ratio", "0.weight", step)
    # One group is recorded as layer "", several as "group<i>".
    assert at(s, "learning_rate", "", 3) == pytest.approx(0.1)
    assert (at(s, "learning_rate", "group0", 4), at(s, "learning_rate", "group1", 4)) == pytest.approx((0.1, 0.05))

    docs = _structures(tmp_path)
    assert sorted(docs) == [0, 4]  # written again at the step the backbone was unfrozen, not on every step
    before, after = _param_doc(docs[0], "0.weight"), _param_doc(docs[4], "0.weight")
    assert (before["requires_grad"], before["in_optimizer"]) == (False, False)
    assert (after["requires_grad"], after["in_optimizer"]) == (True, True)
    assert len(docs[4]["optimizer"]["groups"]) == 2
    assert "no_gradient" not in _findings(tmp_path)


def test_a_backbone_frozen_on_purpose_is_no_finding_and_the_structure_says_when(tmp_path):
    """`requires_grad_(False)` mid-run: grad_missing 1 from then on, no "no gradient" finding, and a
    structure document at the step it happened."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with SummaryWriter(tmp_path) as w, Diagnostics(model, w, every=2, optimizer=opt) as diag:
        for step in range(12):
            if step == 3:
                model[0].requires_grad_(False)
            loss = model(_batch(step)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            diag.step(step, loss=loss)
            opt.step()
    s = read(tmp_path)
    assert [at(s, "grad_missing", "0.weight", t) for t in range(0, 12, 2)] == [0, 0, 1, 1, 1, 1]
    assert at(s, "grad_missing", "2.weight", 10) == 0
    docs = _structures(tmp_path)
    assert sorted(docs) == [0, 4]  # the first logged step after the change
    assert _param_doc(docs[4], "0.weight")["requires_grad"] is False
    assert "no_gradient" not in _findings(tmp_path)


class _WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = _model()
        self.unused = nn.Linear(2, 2)

    def forward(self, x):
        return self.body(x)


def test_a_parameter_that_never_gets_a_gradient_is_still_found(tmp_path):
    """The counterpart: a layer the forward never uses, held by the optimizer, is a finding."""
    model = _WithUnused()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with SummaryWriter(tmp_path) as w, Diagnostics(model, w, every=1, optimizer=opt) as diag:
        for step in range(6):
            loss = model(_batch(step)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            diag.step(step, loss=loss)
            opt.step()
    assert "no_gradient" in _findings(tmp_path)


@pytest.mark.parametrize("assign", [False, True], ids=["copy", "assign"])
def test_a_checkpoint_loaded_mid_run_is_measured_from_the_loaded_weights(tmp_path, assign):
    """`model.load_state_dict` and `opt.load_state_dict` at step 5 rewind to the step-2 checkpoint. With
    ``assign=True`` the model's parameters are new tensors: they are the ones measured from then on."""
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    rec = _Recorder(model)
    ckpt = None
    with SummaryWriter(tmp_path) as w, Diagnostics(model, w, every=1, optimizer=opt) as diag:
        for step in range(9):
            if step == 3:
                ckpt = {k: v.clone() for k, v in model.state_dict().items()}, json.loads(
                    json.dumps(opt.state_dict(), default=lambda t: t.tolist())
                )
            if step == 5:
                model.load_state_dict(ckpt[0], assign=assign)
                state = torch.optim.Adam(model.parameters(), lr=0.01).state_dict()
                opt_state = _restore(ckpt[1])
                if assign:  # the new tensors must be what the optimizer steps
                    opt = torch.optim.Adam(model.parameters(), lr=0.01)
                    diag.set_optimizer(opt)
                    state = opt.state_dict()
                opt.load_state_dict({**state, "state": opt_state["state"]})
            loss = model(_batch(step)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            diag.step(step, loss=loss)
            rec.before_step(step)
            opt.step()
            rec.after_step(step)
    s = read(tmp_path)
    _check(s, rec, range(9))
    assert all(at(s, "grad_missing", n, 8) == 0 for n, _ in model.named_parameters())
    # The rewound weights are the checkpoint's: step 5's weight norm equals step 3's.
    assert close(at(s, "weight_norm", "0.weight", 5), at(s, "weight_norm", "0.weight", 3))


def _restore(doc: dict) -> dict:
    return {"state": {int(k): {n: torch.tensor(v) for n, v in st.items()} for k, st in doc["state"].items()}}


@pytest.mark.parametrize("convert", ["half", "bfloat16", "double"])
def test_dtype_changed_after_creation_is_measured_in_the_new_dtype(tmp_path, convert):
    """`model.half()` / `.bfloat16()` / `.to(torch.float64)` after `Diagnostics` was created, at step 3."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = _Recorder(model)
    warnings.simplefilter("error", DiagnosticsWarning)
    dtype = {"half": torch.float16, "bfloat16": torch.bfloat16, "double": torch.float64}[convert]
    with SummaryWriter(tmp_path) as w, Diagnostics(model, w, every=1, optimizer=opt) as diag:
        for step in range(6):
            if step == 3:
                getattr(model, convert)() if convert != "double" else model.to(torch.float64)
            loss = model(_batch(step).to(next(model.parameters()).dtype)).float().pow(2).mean()
            opt.zero_grad()
            loss.backward()
            diag.step(step, loss=loss)
            rec.before_step(step)
            opt.step()
            rec.after_step(step)
    assert next(model.parameters()).dtype == dtype
    s = read(tmp_path)
    # float32 summaries of half-precision tensors: the same numbers to float16's precision.
    _check(s, rec, range(6), rel=1e-5 if convert == "double" else 2e-3)
    assert all(recorded(s, "update_ratio", "0.weight", t) for t in range(6))


def test_a_replaced_optimizer_is_followed_through_set_optimizer(tmp_path):
    """A second optimizer built at step 4 (SGD, then Adam): `diag.set_optimizer(new)` moves the update
    ratio, the learning rate and the structure to it, and removes the hooks on the old one."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = _Recorder(model)
    with SummaryWriter(tmp_path) as w, Diagnostics(model, w, every=1, optimizer=opt) as diag:
        for step in range(8):
            if step == 4:
                old, opt = opt, torch.optim.Adam(model.parameters(), lr=0.003)
                diag.set_optimizer(opt)
                assert not old._optimizer_step_pre_hooks and not old._optimizer_step_post_hooks
            loss = model(_batch(step)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            diag.step(step, loss=loss)
            rec.before_step(step)
            opt.step()
            rec.after_step(step)
    s = read(tmp_path)
    _check(s, rec, range(8))
    assert at(s, "learning_rate", "", 3) == pytest.approx(0.1)
    assert at(s, "learning_rate", "", 4) == pytest.approx(0.003)
    assert "adam_eps_fraction" in s and not recorded(s, "adam_eps_fraction", "0.weight", 3)
    docs = _structures(tmp_path)
    assert sorted(docs) == [0, 4]
    assert (docs[0]["optimizer"]["class"], docs[4]["optimizer"]["class"]) == ("SGD", "Adam")


def test_set_optimizer_rebuilds_what_was_built_from_the_optimizer_and_keeps_the_rest(tmp_path):
    """The collectors the builder made from the optimizer (update ratio, Adam's state, learning rate) are
    closed and built again for the new one; every other collector is the same object, told of the new
    optimizer (the wiring checks' step hook moves with it)."""
    model = _model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    adam = torch.optim.Adam(model.parameters(), lr=0.003)
    with Diagnostics(model, logdir=tmp_path, every=1, optimizer=sgd) as diag:
        before = list(diag.collectors)
        hooks = (len(sgd._optimizer_step_pre_hooks), len(sgd._optimizer_step_post_hooks))
        diag.set_optimizer(adam)
        after = list(diag.collectors)
        assert (len(adam._optimizer_step_pre_hooks), len(adam._optimizer_step_post_hooks)) == hooks
    old = [c for c in before if c.from_optimizer]
    new = [c for c in after if c.from_optimizer]
    assert sorted(type(c).__name__ for c in old) == ["AdamState", "LearningRate", "UpdateRatio"]
    assert sorted(type(c).__name__ for c in new) == sorted(type(c).__name__ for c in old)
    assert not any(c is o for c in new for o in old)
    assert all(c.optimizer is adam for c in new if hasattr(c, "optimizer"))
    kept = [c for c in before if not c.from_optimizer]
    assert len(kept) > 5 and [c for c in after if not c.from_optimizer] == kept  # the same objects, in order
    assert not sgd._optimizer_step_pre_hooks and not sgd._optimizer_step_post_hooks


def test_an_optimizer_replaced_without_set_optimizer_warns_once(tmp_path):
    """Stepping a new optimizer the diagnostics do not know would leave the old one's learning rate on
    record: the logged step whose update never came says so, naming `set_optimizer`."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with SummaryWriter(tmp_path) as w, Diagnostics(model, w, every=1, optimizer=opt) as diag:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(6):
                if step == 2:
                    opt = torch.optim.SGD(model.parameters(), lr=0.01)
                loss = model(_batch(step)).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                diag.step(step, loss=loss)
                opt.step()
    mine = [w for w in caught if issubclass(w.category, DiagnosticsWarning)]
    assert len(mine) == 1 and "set_optimizer" in str(mine[0].message)


def test_set_optimizer_rejects_what_is_not_an_optimizer(tmp_path):
    model = _model()
    with Diagnostics(model, logdir=tmp_path) as diag, pytest.raises(TypeError, match="optimizer"):
        diag.set_optimizer(model)


def test_data_parallel_records_the_module_under_its_own_names(tmp_path):
    """`nn.DataParallel(model)`: names are the module's own ("0.weight"), values those of the plain model.
    (Here on CPU DataParallel runs the module itself; replicas on several GPUs are not tested.)"""
    model = _model()
    dp = nn.DataParallel(model)
    opt = torch.optim.SGD(dp.parameters(), lr=0.1)
    rec = _Recorder(model)
    with SummaryWriter(tmp_path) as w, Diagnostics(dp, w, every=1, optimizer=opt) as diag:
        for step in range(4):
            loss = dp(_batch(step)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            diag.step(step, loss=loss)
            rec.before_step(step)
            opt.step()
            rec.after_step(step)
    s = read(tmp_path)
    assert s["grad_norm"].layers == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert "1" in s["dead_fraction"].layers
    _check(s, rec, range(4))


def test_a_module_added_mid_run_is_measured_from_the_next_logged_step(tmp_path):
    """A new head attached to the model and the optimizer at step 3 (multi-task fine-tuning)."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = _Recorder(model)
    with SummaryWriter(tmp_path) as w, Diagnostics(model, w, every=1, optimizer=opt) as diag:
        for step in range(6):
            if step == 3:
                model.append(nn.Linear(3, 2))
                opt.add_param_group({"params": model[3].parameters()})
            loss = model(_batch(step)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            diag.step(step, loss=loss)
            rec.before_step(step)
            opt.step()
            rec.after_step(step)
    s = read(tmp_path)
    _check(s, rec, range(6))
    assert not recorded(s, "grad_norm", "3.weight", 2) and recorded(s, "update_ratio", "3.weight", 3)
    assert sorted(_structures(tmp_path)) == [0, 3]
