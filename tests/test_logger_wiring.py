"""Issue 22 on the logger side: the loop's wiring seen on logged steps, and what happens between them.

Each test trains a real model in a real loop with one everyday bug (or none),
reads back what the logger wrote through the reading path, and compares it
with what the loop itself knows (computed in the loop, independently of the
logger).
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from _logger_helpers import at, close, read, recorded
from torch import nn

from tb_diag_logger import Diagnostics, DiagnosticsWarning


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)


def _holds_gradient(model: nn.Module) -> float:
    """By hand, before a step's backward: 1 if some gradient still holds a non-zero value, else 0."""
    return float(any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.parameters()))


# ----------------------------------------------------------------------------- grad_carried

@pytest.mark.parametrize("reset", ["set_to_none", "zeros", "never"])
def test_grad_carried_says_whether_gradients_were_reset(tmp_path, reset):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    diag = Diagnostics(model, logdir=tmp_path, every=4, optimizer=opt)
    truth = {}
    for step in range(13):
        x, y = _batch(step)
        if reset != "never":
            opt.zero_grad(set_to_none=reset == "set_to_none")
        truth[step] = _holds_gradient(model)
        F.cross_entropy(model(x), y).backward()
        diag.step(step)
        opt.step()
    diag.close()
    series = read(tmp_path)
    for step in (0, 4, 8, 12):
        assert at(series, "grad_carried", "", step) == truth[step], step
    assert truth[12] == (1.0 if reset == "never" else 0.0)  # the loop is what it says


def test_gradient_accumulation_is_not_carried_gradients(tmp_path):
    """Four backwards per optimizer step, zero_grad() after it: the accumulation is not a missing reset."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    diag = Diagnostics(model, logdir=tmp_path, every=2, optimizer=opt)
    truth = {}
    for step in range(5):
        truth[step] = _holds_gradient(model)
        for micro in range(4):
            x, y = _batch(10 * step + micro)
            (F.cross_entropy(model(x), y) / 4).backward()
        diag.step(step)
        opt.step()
        opt.zero_grad()
    diag.close()
    series = read(tmp_path)
    assert [at(series, "grad_carried", "", s) for s in (0, 2, 4)] == [truth[s] for s in (0, 2, 4)] == [0.0] * 3


def test_grad_carried_without_optimizer_uses_the_previous_step_call(tmp_path):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    diag = Diagnostics(model, logdir=tmp_path, every=3)  # no optimizer=: the reference is taken at step()
    for step in range(7):
        x, y = _batch(step)
        F.cross_entropy(model(x), y).backward()  # never reset
        diag.step(step)
        opt.step()
    diag.close()
    series = read(tmp_path)
    assert [at(series, "grad_carried", "", s) for s in (0, 3, 6)] == [0.0, 1.0, 1.0]


def test_tensor_hook_only_while_a_logged_step_is_coming(tmp_path):
    """The probe's hook exists from the step() before a logged step to it, never after close(); a copy
    of the model made while it is there carries none of it and trains."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    diag = Diagnostics(model, logdir=tmp_path, every=5, optimizer=opt)

    def hooked() -> int:
        return sum(len(p._backward_hooks or {}) for p in model.parameters())

    counts = {}
    for step in range(10):
        x, y = _batch(step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        diag.step(step)
        opt.step()
        counts[step] = hooked()
    twin = copy.deepcopy(model)
    assert sum(len(p._backward_hooks or {}) for p in twin.parameters()) == 0
    F.cross_entropy(twin(x), y).backward()
    diag.close()
    assert counts == {s: int(s == 4 or s == 9) for s in range(10)}
    assert hooked() == 0


# ------------------------------------------------------------------------------ step order

def test_step_called_before_backward_warns_once_and_records_no_gradients(tmp_path):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    diag = Diagnostics(model, logdir=tmp_path, every=2, optimizer=opt)
    losses = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(5):
            x, y = _batch(step)
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            losses[step] = float(loss)
            assert all(p.grad is None for p in model.parameters())  # what step() sees, by hand
            diag.step(step, loss=loss)  # the bug: before backward()
            loss.backward()
            opt.step()
    diag.close()
    ours = [w for w in caught if issubclass(w.category, DiagnosticsWarning)]
    assert len(ours) == 1
    assert "call diag.step() after loss.backward() and before optimizer.step()" in str(ours[0].message)
    assert ours[0].filename == __file__  # at the user's call
    series = read(tmp_path)
    for step in (0, 2, 4):
        assert close(at(series, "loss", "total", step), losses[step])
        for metric, layer in (("grad_norm", "0.weight"), ("grad_missing", "0.weight"), ("grad_norm_total", "")):
            assert not recorded(series, metric, layer, step), (metric, step)
        assert math.isnan(at(series, "grad_carried", "", step))


def test_step_after_backward_gives_no_warning(tmp_path):
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DiagnosticsWarning)
        diag = Diagnostics(model, logdir=tmp_path, every=2, optimizer=opt)
        for step in range(5):
            x, y = _batch(step)
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            diag.step(step, loss=loss)
            opt.step()
        diag.close()
    series = read(tmp_path)
    assert recorded(series, "grad_norm", "0.weight", 4) and at(series, "grad_missing", "0.weight", 4) == 0.0


# ----------------------------------------------------------------------------- module modes

class _BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.bn = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.3)
        self.still = nn.Dropout(0.0)  # p = 0: the mode changes nothing
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(self.still(self.drop(F.relu(self.bn(self.fc1(x))))))


def _modes_run(tmp_path, train_mode_in_training: bool, eval_mode_in_evaluation: bool):
    torch.manual_seed(0)
    model = _BNNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    diag = Diagnostics(model, logdir=tmp_path, every=3, optimizer=opt)
    truth_eval, truth_train = {}, {}
    for step in range(7):
        model.train(train_mode_in_training)
        x, y = _batch(step)
        truth_eval[step] = {n: float(not m.training) for n, m in (("bn", model.bn), ("drop", model.drop))}
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        diag.step(step)
        opt.step()
        if step % 2 == 1:  # evaluation on odd steps
            model.train(not eval_mode_in_evaluation)
            with torch.no_grad():
                model(x)
            truth_train[step] = {n: float(m.training) for n, m in (("bn", model.bn), ("drop", model.drop))}
    diag.close()
    return read(tmp_path), truth_eval, truth_train


def test_model_eval_never_undone_is_recorded_per_module(tmp_path):
    series, truth_eval, _ = _modes_run(tmp_path, train_mode_in_training=False, eval_mode_in_evaluation=True)
    assert series["eval_in_train"].layers == ["bn", "drop"]  # Dropout(p=0) is not mode-sensitive
    for step in (0, 3, 6):
        for layer in ("bn", "drop"):
            assert at(series, "eval_in_train", layer, step) == truth_eval[step][layer] == 1.0
            assert at(series, "train_in_eval", layer, step) == 0.0


def test_evaluation_without_model_eval_is_recorded(tmp_path):
    series, truth_eval, truth_train = _modes_run(tmp_path, train_mode_in_training=True, eval_mode_in_evaluation=False)
    # Evaluations in training mode ran after the step() calls of steps 1, 3 and 5: the window ending at
    # logged step 3 saw step 1's, the one ending at 6 those of steps 3 and 5, the first logged step none.
    assert at(series, "train_in_eval", "bn", 0) == 0.0
    assert at(series, "train_in_eval", "bn", 3) == truth_train[1]["bn"] == 1.0
    assert at(series, "train_in_eval", "drop", 6) == truth_train[5]["drop"] == 1.0
    assert all(at(series, "eval_in_train", "bn", s) == truth_eval[s]["bn"] == 0.0 for s in (0, 3, 6))


def test_healthy_modes_record_zeros(tmp_path):
    series, _, _ = _modes_run(tmp_path, train_mode_in_training=True, eval_mode_in_evaluation=True)
    for step in (0, 3, 6):
        for metric in ("eval_in_train", "train_in_eval"):
            assert at(series, metric, "bn", step) == at(series, metric, "drop", step) == 0.0


# --------------------------------------------------------------------------- logit range

@pytest.mark.parametrize("softmax", [True, False])
def test_logit_range_and_row_sums_of_the_head(tmp_path, softmax):
    torch.manual_seed(0)
    layers = [nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 5)] + ([nn.Softmax(dim=-1)] if softmax else [])
    model = nn.Sequential(*layers)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    diag = Diagnostics(model, logdir=tmp_path, every=2, optimizer=opt)
    outputs = {}
    for step in range(3):
        x, y = _batch(step)
        out = model(x)
        outputs[step] = out.detach().clone()
        opt.zero_grad()
        F.cross_entropy(out, y).backward()  # the everyday bug when softmax=True: softmax twice
        diag.step(step)
        opt.step()
    diag.close()
    series = read(tmp_path)
    for step in (0, 2):
        rows = outputs[step].double().tolist()
        lo = min(min(r) for r in rows)
        hi = max(max(r) for r in rows)
        dev = max(abs(sum(r) - 1) for r in rows)
        assert close(at(series, "logit_min", "2", step), lo)
        assert close(at(series, "logit_max", "2", step), hi)
        assert close(at(series, "logit_rowsum_dev", "2", step), dev, rel=1e-4, abs_=1e-6)
        if softmax:
            assert 0 <= lo and hi <= 1 and dev < 1e-5
        else:
            assert dev > 0.1


# ------------------------------------------------------------------------ optimizer orphans

def test_head_replaced_after_the_optimizer_was_built(tmp_path):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model[2] = nn.Linear(16, 3)  # the new head is in no group; the old one's two tensors are orphans
    model_ids = {id(p) for p in model.parameters()}
    truth = sum(1 for g in opt.param_groups for p in g["params"] if id(p) not in model_ids)
    diag = Diagnostics(model, logdir=tmp_path, every=2, optimizer=opt)
    for step in range(3):
        x, y = _batch(step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        diag.step(step)
        opt.step()
    diag.close()
    series = read(tmp_path)
    assert at(series, "optimizer_orphans", "", 0) == at(series, "optimizer_orphans", "", 2) == truth == 2


# --------------------------------------------------------------------- between logged steps

def _spiky_run(tmp_path, grad_norm: str):
    """every=10; step 13's batch is scaled by 100 (a loss spike), step 17's holds a NaN (NaN from then on)."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    diag = Diagnostics(model, logdir=tmp_path, every=10, optimizer=opt,
                       grad_norm_every_step=grad_norm == "measured")
    losses, norms = {}, {}
    for step in range(21):
        x, y = _batch(step)
        if step == 13:
            x = x * 100
        if step == 17:
            x[0, 0] = float("nan")
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        losses[step] = float(loss)
        # By hand: the global norm from every gradient's elements.
        norms[step] = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in model.parameters()))
        kwargs = {}
        if grad_norm == "passed":
            kwargs["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)
        diag.step(step, loss=loss, **kwargs)
        opt.step()
    diag.close()
    return read(tmp_path), losses, norms


@pytest.mark.parametrize("grad_norm", ["passed", "measured", "none"])
def test_a_spike_and_the_first_nan_between_logged_steps_are_seen(tmp_path, grad_norm):
    series, losses, norms = _spiky_run(tmp_path, grad_norm)
    window_1, window_2 = range(1, 11), range(11, 21)
    assert close(at(series, "loss_max_between", "total", 10), max(losses[s] for s in window_1))
    assert close(at(series, "loss_min_between", "total", 10), min(losses[s] for s in window_1))
    finite_2 = [losses[s] for s in window_2 if math.isfinite(losses[s])]
    assert math.isnan(losses[17]) and max(finite_2) == losses[13] > 10 * losses[12]
    assert close(at(series, "loss_max_between", "total", 20), max(finite_2))
    assert close(at(series, "loss_min_between", "total", 20), min(finite_2))
    assert math.isnan(at(series, "nonfinite_first_step", "", 10))
    assert at(series, "nonfinite_first_step", "", 20) == 17
    if grad_norm == "none":
        assert math.isnan(at(series, "grad_norm_max_between", "", 10))
    else:
        assert close(at(series, "grad_norm_max_between", "", 10), max(norms[s] for s in window_1), rel=1e-4)
        finite_norms = [norms[s] for s in window_2 if math.isfinite(norms[s])]
        assert close(at(series, "grad_norm_max_between", "", 20), max(finite_norms), rel=1e-4)


def test_python_float_losses_count_too(tmp_path):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    diag = Diagnostics(model, logdir=tmp_path, every=4, optimizer=opt)
    losses = {}
    for step in range(5):
        x, y = _batch(step)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        losses[step] = loss.item()
        diag.step(step, loss=losses[step])
        opt.step()
    diag.close()
    series = read(tmp_path)
    assert close(at(series, "loss_max_between", "total", 4), max(losses[s] for s in range(1, 5)))
    assert close(at(series, "loss_min_between", "total", 4), min(losses[s] for s in range(1, 5)))


def test_bad_grad_norm_every_step_is_a_type_error(tmp_path):
    with pytest.raises(TypeError, match="grad_norm_every_step"):
        Diagnostics(_mlp(), logdir=tmp_path, grad_norm_every_step="yes")


def test_amp_overflow_steps_are_the_scalers_and_norms_are_unscaled(tmp_path):
    """fp16 on CPU with a GradScaler starting at 2**20: the first backwards overflow and the scaler skips
    them; they are not non-finite steps, and the measured norms are those of the unscaled gradients."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20)
    diag = Diagnostics(model, logdir=tmp_path, every=10, optimizer=opt, scaler=scaler, grad_norm_every_step=True)
    norms, skipped = {}, 0
    for step in range(21):
        x, y = _batch(step)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scale = scaler.get_scale()
        # By hand: the unscaled global norm (inf where the fp16 backward overflowed).
        norms[step] = math.sqrt(sum(float(((p.grad.double() / scale) ** 2).sum()) for p in model.parameters()))
        skipped += not math.isfinite(norms[step])
        diag.step(step, loss=loss)
        scaler.step(opt)
        scaler.update()
    diag.close()
    series = read(tmp_path)
    assert skipped >= 1  # the run did overflow
    for end in (10, 20):
        assert math.isnan(at(series, "nonfinite_first_step", "", end))
        window = [norms[s] for s in range(end - 9, end + 1) if math.isfinite(norms[s])]
        assert close(at(series, "grad_norm_max_between", "", end), max(window), rel=1e-4)
