"""The logger measures what it costs the job it runs in, and says so once when that is a lot."""

from __future__ import annotations

import time
import warnings

import numpy as np
import torch
from _logger_helpers import WideModel, cpu_hog
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from tb_diag_logger import Diagnostics, DiagnosticsCostWarning, DiagnosticsWarning
from tb_diag_logger import cost as cost_module
from tb_diag_logger.cost import CostMeter


def _train(tmp_path, model: nn.Module, x: torch.Tensor, every: int, steps: int, between=None):
    """Train `steps` steps with Diagnostics(every=every); returns it (closed) and the warnings, by kind."""
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    diag = Diagnostics(model, SummaryWriter(str(tmp_path)), every=every, optimizer=opt)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for s in range(steps):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            diag.step(s)
            opt.step()
            if between is not None:
                between(s)
    diag.close()
    cost = [str(w.message) for w in rec if issubclass(w.category, DiagnosticsCostWarning)]
    failures = [str(w.message) for w in rec if issubclass(w.category, DiagnosticsWarning)]
    return diag, cost, failures


def test_a_costly_model_gets_one_warning_naming_the_parts(tmp_path, monkeypatch):
    # Where others' jobs keep this thread waiting, the meter says nothing (tested below); here the
    # cost itself is under test, so the machine's business is taken as unknown.
    monkeypatch.setattr(cost_module, "_run_delay", lambda: None)
    torch.manual_seed(0)
    diag, cost, failures = _train(tmp_path, WideModel(300), torch.randn(4, 2), every=4, steps=40)
    assert len(cost) == 1, cost
    assert "300 activation sites" in cost[0] and "every= (now 4)" in cost[0]
    assert "activation capture" in cost[0] and "update ratio" in cost[0]
    assert diag._cost.last["share"] > 0.05 and diag._cost.last["forward_s"] > 0
    assert not failures


def test_an_ordinary_model_is_measured_and_not_warned_about(tmp_path):
    """An MLP whose logged step costs a few percent: measured, no warning, although another CPU-heavy
    job shares the machine; an evaluation pass and a slow pause at every logged step (a data loader,
    a checkpoint) do not count against the logger."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))

    def evaluate_and_pause(step: int) -> None:
        if step % 5 == 0:
            with torch.no_grad():
                model(torch.randn(2048, 256))
            time.sleep(0.05)

    with cpu_hog():
        diag, cost, _ = _train(tmp_path, model, torch.randn(512, 256), every=5, steps=60, between=evaluate_and_pause)
    assert not cost
    assert diag._cost.last is not None, "the cost was never measured"


def test_without_steps_that_are_not_logged_nothing_is_claimed(tmp_path):
    """every=1: there is no step without diagnostics to compare with, so no share and no warning."""
    torch.manual_seed(0)
    diag, cost, _ = _train(tmp_path, WideModel(100), torch.randn(4, 2), every=1, steps=12)
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
