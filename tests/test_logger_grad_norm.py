"""`diag.step(grad_norm=)`: the pre-clip global gradient norm, beside the post-clip one measured by the logger."""

from __future__ import annotations

import math

import pytest
import torch
from _logger_helpers import at, close, read
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from tb_diag_logger import Diagnostics


@pytest.mark.parametrize("as_tensor", [True, False], ids=["tensor", "float"])
def test_preclip_norm_is_recorded_as_given_and_the_total_is_post_clip(tmp_path, as_tensor):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2))
    writer = SummaryWriter(str(tmp_path))
    by_hand = {}
    with Diagnostics(model, writer, every=2) as diag:
        for step in range(4):
            (model(torch.randn(8, 5)) * 10).square().mean().backward()
            # independent of clip_grad_norm_: the square root of the summed squares of every gradient
            by_hand[step] = math.sqrt(sum(float(p.grad.double().square().sum()) for p in model.parameters()))
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.5)
            diag.step(step, grad_norm=norm if as_tensor else float(norm))
            model.zero_grad()
    writer.close()
    series = read(tmp_path)
    for step in (0, 2):
        assert by_hand[step] > 0.5  # so clipping did change the step
        assert close(at(series, "grad_norm_preclip", "", step), by_hand[step], rel=1e-5)
        assert close(at(series, "grad_norm_total", "", step), 0.5, rel=1e-4)
    assert series["grad_norm_preclip"].steps.tolist() == [0, 2]


@pytest.mark.parametrize("bad, error", [("1.0", TypeError), (torch.ones(3), ValueError), (True, TypeError)])
def test_a_bad_grad_norm_names_the_argument(tmp_path, bad, error):
    writer = SummaryWriter(str(tmp_path))
    with Diagnostics(nn.Linear(2, 2), writer) as diag, pytest.raises(error, match="grad_norm"):
        diag.step(0, grad_norm=bad)
    writer.close()
