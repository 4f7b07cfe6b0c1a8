"""Closure-driven optimizers in the plain API (`opt.step(closure)`: LBFGS, SGD with a closure).

`diag.step()` is called inside the closure, after backward, as Lightning does;
checked against weights copied outside before and after each optimizer step.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _logger_helpers import at, close, read, unit_dead_fraction
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from tb_diag_logger import Diagnostics


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 1))
    with torch.no_grad():
        model[0].bias[:3] = -50.0  # three of six units dead for every sample
    return model


def _ratios(before: dict[str, torch.Tensor], model: nn.Module) -> dict[str, float]:
    """‖w_after − w_before‖ / ‖w_before‖ per parameter, by hand."""
    return {
        n: ((p.detach() - before[n]).norm() / before[n].norm()).item() for n, p in model.named_parameters()
    }


@pytest.mark.parametrize("make_opt", [
    pytest.param(lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), id="sgd"),
    pytest.param(lambda ps: torch.optim.LBFGS(ps, lr=0.5, max_iter=4), id="lbfgs"),
])
def test_closure_steps_record_the_update_ratio_activations_and_loss_of_each_step(tmp_path, make_opt):
    model = _model()
    opt = make_opt(model.parameters())
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    want_ratio, want_dead, want_mean, want_loss, calls = {}, {}, {}, {}, []
    writer = SummaryWriter(str(tmp_path))
    with Diagnostics(model, writer, every=1, optimizer=opt) as diag:
        for step in range(3):
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            with torch.no_grad():  # the step's first evaluation, at the weights before the update
                h = F.relu(model[0](x))
                want_dead[step] = unit_dead_fraction(h.numpy())
                want_mean[step] = h.mean().item()  # LBFGS's later evaluations (other weights) must not mix in
                want_loss[step] = F.mse_loss(model[2](h), y).item()

            def closure(step=step):  # bound now: the loop moves on
                opt.zero_grad()
                loss = F.mse_loss(model(x), y)
                loss.backward()
                calls.append(step)
                diag.step(step, loss=loss)  # every evaluation may call it: the first one counts
                return loss

            opt.step(closure)
            want_ratio[step] = _ratios(before, model)
    writer.close()

    s = read(tmp_path)
    if "lbfgs" in str(type(opt)).lower():
        assert len(calls) > 3, "LBFGS should evaluate the closure more than once per step"
    for step in range(3):
        assert close(at(s, "loss", "total", step), want_loss[step], rel=1e-5)
        assert at(s, "dead_fraction", "1", step) == pytest.approx(want_dead[step])
        assert close(at(s, "act_mean", "1", step), want_mean[step], rel=1e-5)
        assert want_dead[step] >= 0.5  # the three dead units stay dead (LBFGS may kill more)
        for name, want in want_ratio[step].items():
            assert want > 0
            assert close(at(s, "update_ratio", name, step), want, rel=1e-4), (name, step)


def test_a_closure_whose_optimizer_skips_the_snapshot_records_no_stale_ratio(tmp_path):
    # Logged, unlogged, logged: the unlogged step in between must not measure anything.
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    want = {}
    writer = SummaryWriter(str(tmp_path))
    with Diagnostics(model, writer, every=2, optimizer=opt) as diag:
        for step in range(4):
            before = {n: p.detach().clone() for n, p in model.named_parameters()}

            def closure(step=step):  # bound now: the loop moves on
                opt.zero_grad()
                loss = F.mse_loss(model(x), y)
                loss.backward()
                diag.step(step, loss=loss)
                return loss

            opt.step(closure)
            want[step] = _ratios(before, model)
    writer.close()
    s = read(tmp_path)
    assert s["update_ratio"].steps.tolist() == [0, 2]
    for step in (0, 2):
        for name, w in want[step].items():
            assert close(at(s, "update_ratio", name, step), w, rel=1e-4), (name, step)


def test_repeated_step_numbers_outside_a_closure_step_still_raise(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Diagnostics(model, logdir=str(tmp_path), every=1, optimizer=opt) as diag:
        F.mse_loss(model(torch.randn(2, 4)), torch.zeros(2, 1)).backward()
        diag.step(0)
        opt.step()
        with pytest.raises(ValueError, match="step must increase"):
            diag.step(0)
