"""Gradient accumulation: several backward passes, then one `step()` before `optimizer.step()`."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from _logger_helpers import at, close, read
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from tb_diag_logger import Diagnostics


def _model() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]))
        model[0].bias.copy_(torch.tensor([0.0, -1.0, 0.0]))
    return model


# Unit 0 of the ReLU is positive only in the second micro-batch, unit 1 never, unit 2 in all.
MICRO = [
    torch.tensor([[-1.0, 1.0], [-2.0, 0.5]]),
    torch.tensor([[1.0, 2.0], [-1.0, 1.0]]),
    torch.tensor([[-0.5, 3.0], [-3.0, 1.0]]),
]


def test_norms_are_those_of_the_accumulated_gradient(tmp_path):
    torch.manual_seed(0)
    model = _model()
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    accumulated = {}
    writer = SummaryWriter(str(tmp_path))
    with Diagnostics(model, writer, every=1, optimizer=opt) as diag:
        for step in range(2):
            total = torch.zeros(())
            for x in MICRO:
                loss = model(x).pow(2).mean() / len(MICRO)
                loss.backward()
                total += loss.detach()
            accumulated[step] = {n: p.grad.clone() for n, p in model.named_parameters()}
            diag.step(step, loss=total)
            opt.step()
            opt.zero_grad()
    writer.close()

    s = read(tmp_path)
    for step, grads in accumulated.items():
        for name, g in grads.items():
            assert close(at(s, "grad_norm", name, step), g.norm().item()), (name, step)
            assert close(at(s, "grad_max_abs", name, step), g.abs().max().item()), (name, step)
        want_total = math.sqrt(sum(g.norm().item() ** 2 for g in grads.values()))
        assert close(at(s, "grad_norm_total", "", step), want_total)

    # The same gradient as one backward over the whole batch (equal micro-batches).
    full = reference(torch.cat(MICRO)).pow(2).mean()
    full.backward()
    for name, p in reference.named_parameters():
        assert close(at(s, "grad_norm", name, 0), p.grad.norm().item(), rel=1e-5), name
    assert close(at(s, "loss", "total", 0), full.item(), rel=1e-5)


def test_activation_statistics_cover_every_micro_batch(tmp_path):
    model = _model()
    writer = SummaryWriter(str(tmp_path))
    with Diagnostics(model, writer, every=1) as diag:
        for x in MICRO:
            model(x).sum().backward()
        diag.step(0)
    writer.close()
    s = read(tmp_path)
    # Unit 0 is dead in micro-batches 1 and 3 but alive in 2: only unit 1 is dead.
    assert at(s, "dead_fraction", "1", 0) == pytest.approx(1 / 3)
    outputs = torch.relu(model[0](torch.cat(MICRO))).detach().numpy()
    assert close(at(s, "act_mean", "1", 0), float(np.mean(outputs)), abs_=1e-6)
    assert close(at(s, "act_std", "1", 0), float(np.std(outputs, ddof=1)), rel=1e-4)
