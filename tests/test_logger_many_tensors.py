"""Issue 24.5: a model of thousands of small tensors, logged at every step through the grouped paths
(flat buffers, plans and names kept between steps), records what a per-tensor computation gives."""

from __future__ import annotations

import math

import numpy as np
import torch
from _logger_helpers import at, close, read, recorded
from torch import nn

from tb_diag_logger import Diagnostics
from tb_diag_logger.collectors import optim_state

SHAPES = [(3,), (2, 3), (4, 4), (1,), (5, 2), (2, 2, 2)]
N = 2000
UNUSED = 7  # a parameter the forward never reads: no gradient, not stepped


class _Many(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.p = nn.ParameterList(nn.Parameter(torch.randn(SHAPES[i % len(SHAPES)])) for i in range(N))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.cat([p.reshape(-1) for i, p in enumerate(self.p) if i != UNUSED])
        # Some tensors' gradients a thousand times smaller than others: Adam's eps matters for a share of them.
        return ((w * x).sum() - 1.0) ** 2 + 0.01 * w.pow(2).sum()


def _adam_expected(opt: torch.optim.Optimizer, p: torch.Tensor) -> tuple[float, float]:
    """(share of sqrt(v_hat) < eps, RMS of m_hat / (sqrt(v_hat) + eps)) in float64, from Adam's state."""
    g = opt.param_groups[0]
    st = opt.state[p]
    (beta1, beta2), eps, t = g["betas"], g["eps"], float(st["step"])
    m = st["exp_avg"].double().numpy() / (1 - beta1 ** t)
    root = np.sqrt(st["exp_avg_sq"].double().numpy() / (1 - beta2 ** t))
    return float(np.mean(root < eps)), float(np.sqrt(np.mean((m / (root + eps)) ** 2)))


def test_two_thousand_small_tensors_record_what_each_tensor_computed_alone_gives(tmp_path):
    torch.manual_seed(0)
    model = _Many()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, eps=1e-3)
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    scale = torch.cat([torch.full((p.numel(),), 1e-4 if i % 3 == 0 else 1.0)
                       for i, p in enumerate(params) if i != UNUSED])
    expected: dict[tuple[str, str, int], float] = {}
    with Diagnostics(model, logdir=str(tmp_path), every=1, optimizer=opt, activations=False) as diag:
        for step in range(4):
            opt.zero_grad()
            model(torch.randn(scale.numel()) * scale).backward()
            for name, p in zip(names, params):
                w = p.detach().double()
                expected[("weight_norm", name, step)] = w.norm().item()
                if p.grad is None:
                    continue
                g = p.grad.double()
                expected[("grad_norm", name, step)] = g.norm().item()
                expected[("grad_max_abs", name, step)] = g.abs().max().item()
                if p in opt.state:  # Adam's state exists from its first step on
                    fraction, rms = _adam_expected(opt, p)
                    expected[(optim_state.EPS_FRACTION, name, step)] = fraction
                    expected[(optim_state.UPDATE_RMS, name, step)] = rms
            before = [p.detach().clone() for p in params]
            diag.step(step)
            opt.step()
            for name, p, old in zip(names, params, before):
                if p.grad is not None:
                    expected[("update_ratio", name, step)] = ((p.detach() - old).double().norm()
                                                              / old.double().norm()).item()
        assert diag._norms._grad_plan._plan.impl == "flat"  # the grouped path is the one measured here

    s = read(tmp_path)
    assert s["grad_norm"].layers == [n for i, n in enumerate(names) if i != UNUSED]
    assert not recorded(s, "update_ratio", names[UNUSED], 1)
    assert at(s, "grad_missing", names[UNUSED], 2) == 1.0 and at(s, "grad_missing", names[0], 2) == 0.0
    assert not recorded(s, optim_state.EPS_FRACTION, names[0], 0)  # no state before the first update
    fractions = [v for (metric, _, _), v in expected.items() if metric == optim_state.EPS_FRACTION]
    assert 0.0 < np.mean(fractions) < 1.0  # both sides of eps are exercised
    wrong = [(key, at(s, key[0], key[1], key[2]), want) for key, want in expected.items()
             if not close(at(s, key[0], key[1], key[2]), want, rel=1e-4, abs_=1e-6)]
    assert not wrong, wrong[:5]
    assert len(expected) > 6 * N and not any(math.isnan(v) for v in expected.values())
