"""Issue 15's logger side: unknown activation statistics, grad_missing, the structure's optimizer view,
output-logit growth and Adam state, each against an independent computation."""

from __future__ import annotations

import math

import numpy as np
import torch
from _logger_helpers import at, close, read, unit_dead_fraction
from torch import nn

from tb_diag_logger import Diagnostics


def test_activation_statistics_of_non_finite_activations_are_nan_not_zero(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    inputs = {0: torch.randn(6, 3), 1: torch.full((6, 3), float("nan")), 2: torch.full((6, 3), float("inf"))}
    hidden = {}
    with Diagnostics(model, logdir=str(tmp_path), every=1) as diag:
        for step, x in inputs.items():
            hidden[step] = torch.relu(model[0](x)).detach().numpy()
            model(x).sum().backward()
            diag.step(step)
    series = read(tmp_path)
    assert close(at(series, "dead_fraction", "1", 0), unit_dead_fraction(hidden[0]))
    assert close(at(series, "act_mean", "1", 0), float(hidden[0].mean()))
    for step in (1, 2):
        # NaN compares false, so "never positive" used to read 0 dead units here.
        assert not np.isfinite(hidden[step]).all()
        for metric in ("dead_fraction", "act_mean", "act_std"):
            assert math.isnan(at(series, metric, "1", step)), (metric, step)
