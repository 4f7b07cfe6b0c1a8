"""The logger measures what it costs the job it runs in, and says so once when that is a lot."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from _logger_helpers import WideModel
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from tb_diag_logger import Diagnostics, DiagnosticsCostWarning, DiagnosticsWarning
from tb_diag_logger import cost as cost_module
from tb_diag_logger.cost import CostMeter


class _Clock:
    """CPU seconds as the test says they pass: the logger's clock (`cost.clock`) reads this one."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _train(tmp_path, monkeypatch, model: nn.Module, x: torch.Tensor, every: int, steps: int, *,
           forward_s: float, logged_work_s: float = 0.0, between=None):
    """Train `steps` steps with Diagnostics(every=every) on a given clock: every training forward takes
    `forward_s`, a logged step's own work in step() `logged_work_s` (an observer of its values advances the
    clock). Returns the Diagnostics (closed) and the warnings, by kind."""
    clock = _Clock()
    monkeypatch.setattr(cost_module, "clock", clock)
    monkeypatch.setattr(cost_module, "_run_delay", lambda: None)  # the machine's business: unknown
    first = next(m for m in model.modules() if not list(m.children()))
    first.register_forward_hook(lambda *args: clock.advance(forward_s) if torch.is_grad_enabled() else None)
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    diag = Diagnostics(model, SummaryWriter(str(tmp_path)), every=every, optimizer=opt)
    # Only the logged step's own values (not the update ratio, written at the next step()).
    diag.observers.append(lambda step, items: clock.advance(logged_work_s) if items[0][0] != "update_ratio" else None)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for s in range(steps):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            diag.step(s)
            opt.step()
            if between is not None:
                between(s, clock)
    diag.close()
    cost = [str(w.message) for w in rec if issubclass(w.category, DiagnosticsCostWarning)]
    assert all(w.filename == __file__ for w in rec if issubclass(w.category, DiagnosticsCostWarning))  # diag.step()
    failures = [str(w.message) for w in rec if issubclass(w.category, DiagnosticsWarning)]
    return diag, cost, failures


def test_a_costly_model_gets_one_warning_naming_the_parts(tmp_path, monkeypatch):
    """Steps of 10 ms and 50 ms of work per logged step at every=4: logging is most of the time."""
    diag, cost, failures = _train(tmp_path, monkeypatch, WideModel(30), torch.randn(4, 2), every=4, steps=40,
                                  forward_s=0.010, logged_work_s=0.050)
    assert len(cost) == 1, cost
    assert "30 activation sites, 60 parameter tensors" in cost[0] and "every= (now 4)" in cost[0]
    assert "step() 50 ms" in cost[0] and "activation capture" in cost[0] and "update ratio" in cost[0]
    assert diag._cost.last["share"] == pytest.approx(0.050 / (4 * 0.010))
    assert not failures


def test_an_ordinary_model_is_measured_and_not_warned_about(tmp_path, monkeypatch):
    """Logging that adds 1 % is measured and not warned about; an evaluation pass and a slow pause after
    every logged step (a data loader, a checkpoint) do not count against the logger."""
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

    def evaluate_and_pause(step: int, clock: _Clock) -> None:
        if step % 5 == 0:
            with torch.no_grad():
                model(torch.randn(64, 16))
            clock.advance(0.5)

    diag, cost, _ = _train(tmp_path, monkeypatch, model, torch.randn(8, 16), every=5, steps=60,
                           forward_s=0.100, logged_work_s=0.005, between=evaluate_and_pause)
    assert not cost
    assert diag._cost.last["share"] == pytest.approx(0.005 / (5 * 0.100))


def test_without_steps_that_are_not_logged_nothing_is_claimed(tmp_path, monkeypatch):
    """every=1: there is no step without diagnostics to compare with, so no share and no warning."""
    diag, cost, _ = _train(tmp_path, monkeypatch, WideModel(10), torch.randn(4, 2), every=1, steps=12,
                           forward_s=0.010, logged_work_s=0.050)
    assert diag._cost.last is None and not cost


def _meter_warnings(intervals: list[float], logged_cost: float, every: int = 5, run_delay=lambda: None) -> list[str]:
    """Drive a CostMeter as `Diagnostics.step` does, with given step durations (no clock): each step s
    takes intervals[s] of training, plus `logged_cost` of step() work when it is logged."""
    meter, now, out, prev_logged = CostMeter(every, run_delay=run_delay), 0.0, [], False
    for s, seconds in enumerate(intervals):
        logged = s % every == 0
        if prev_logged:
            message = meter.settle(0.0, lambda: "detail")
            if message is not None:
                out.append(message)
        extra = meter.step_called(now, logged, prev_logged, (seconds / 2, logged))
        if logged:
            meter.logged(extra, logged_cost)
        now += seconds + (logged_cost if logged else 0.0)
        prev_logged = logged
    return out


def test_steady_steps_and_a_costly_logger_warn_once():
    assert len(_meter_warnings([0.1] * 200, logged_cost=0.1)) == 1


def test_steps_that_vary_more_than_logging_adds_are_too_noisy_to_tell():
    """The same cost, but the steps that are not logged vary by more than it (another job's
    bursts): nothing is claimed."""
    rng = np.random.default_rng(0)
    noisy = list(rng.uniform(0.05, 0.6, size=200))
    assert _meter_warnings(noisy, logged_cost=0.1) == []
    assert len(_meter_warnings(noisy, logged_cost=2.0)) == 1  # a cost far above the noise still shows


def test_a_thread_kept_waiting_for_a_cpu_is_too_busy_to_tell():
    """Where the training thread waited for a CPU all along (another job has the cores), even a
    cost that would be warned about is not: the machine, not the logger, makes steps slow."""
    waited = [0.0]

    def always_waiting() -> float:
        waited[0] += 1.0  # a second more of waiting at every look: far more than the time between
        return waited[0]

    assert _meter_warnings([0.1] * 200, logged_cost=0.1, run_delay=always_waiting) == []
    assert len(_meter_warnings([0.1] * 200, logged_cost=0.1, run_delay=lambda: 0.0)) == 1  # never waited
