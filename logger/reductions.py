"""Fused reductions over gradients, weights and activations.

Pure functions: tensors in, tensors out, no host transfer. They follow
`torch.nn.utils.clip_grad_norm_`: group by device and dtype, one fused
kernel per group, then stack. The caller concatenates everything a logged
step needs and moves it to the host once.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch

# Saturation: an output is in a flat tail when the activation's derivative
# there is below 5 % of its peak. sigmoid' = y(1-y) peaks at 0.25, so
# y(1-y) <= 0.0125, i.e. y <= 0.01266 or y >= 0.98734; tanh' = 1-y^2 peaks at
# 1, so |y| >= sqrt(0.95) = 0.97468. Gradients through such outputs are
# attenuated at least 20x, which is what makes saturation harmful.
SATURATION_DERIVATIVE_SHARE = 0.05
SIGMOID_TAIL = 0.5 - (0.25 - SATURATION_DERIVATIVE_SHARE * 0.25) ** 0.5  # 0.012661
TANH_TAIL = (1.0 - SATURATION_DERIVATIVE_SHARE) ** 0.5  # 0.974679

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), the tensor itself otherwise."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def grouped_norms(tensors: Sequence[torch.Tensor], out_device: torch.device) -> torch.Tensor:
    """L2 norm of each tensor as a float32 vector on `out_device`.

    One `torch._foreach_norm` per (device, dtype) group, as clip_grad_norm_
    does; empty tensors have norm 0.
    """
    if not tensors:
        return torch.zeros(0, device=out_device)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        groups[(t.device, t.dtype)].append(i)
    out = torch.empty(len(tensors), dtype=torch.float32, device=out_device)
    for idx in groups.values():
        norms = torch._foreach_norm([tensors[i] for i in idx])
        vals = torch.stack([n.to(torch.float32) for n in norms]).to(out_device)
        out[torch.tensor(idx, device=out_device)] = vals
    return out


def max_abs(tensors: Sequence[torch.Tensor], out_device: torch.device) -> torch.Tensor:
    """Largest absolute element of each tensor (0 for empty ones).

    `aminmax` costs about what an L2 norm costs on CPU, where
    `_foreach_norm(ord=inf)` is ~18x slower (PERF_NOTES.md). NaN propagates.
    """
    vals = []
    for t in tensors:
        if t.numel() == 0:
            vals.append(torch.zeros((), dtype=torch.float32, device=out_device))
            continue
        lo, hi = torch.aminmax(t)
        vals.append(torch.maximum(hi.float(), -lo.float()).to(out_device))
    if not vals:
        return torch.zeros(0, device=out_device)
    return torch.stack(vals)


def nonfinite_counts(tensors: Sequence[torch.Tensor]) -> list[int]:
    """Number of NaN/Inf elements of each tensor (host ints).

    Only called for the tensors whose norm came back non-finite: a finite
    L2 norm means every element is finite, and `isfinite` over every
    tensor is the slowest part of a naive implementation.
    """
    return [int((~torch.isfinite(t)).sum().item()) for t in tensors]


def unit_dims(ndim: int) -> tuple[int, ...]:
    """Dimensions reduced over to get one value per unit.

    A unit is a feature of a (N, F) output, a channel of a (N, C, ...) conv
    output (4-D and 5-D), and the last dimension of a (N, T, D) sequence
    output (the transformer convention). 0-D and 1-D outputs are one unit
    per element.
    """
    if ndim <= 1:
        return ()
    if ndim == 3:
        return (0, 1)
    return tuple(d for d in range(ndim) if d != 1)


def unit_max(y: torch.Tensor) -> torch.Tensor:
    """Per-unit maximum over the batch, float32, flattened.

    A unit is dead for a batch when this is <= 0: no sample made it positive.
    Float `amax` is used instead of boolean comparisons, which are 5-20x
    slower on CPU (PERF_NOTES.md).
    """
    dims = unit_dims(y.ndim)
    m = y.amax(dim=dims) if dims else y
    return m.detach().reshape(-1).to(torch.float32)


def moments(y: torch.Tensor) -> torch.Tensor:
    """[sum, sum of squares, count] of all elements, float32, no large temporaries."""
    y = y.detach()
    n = torch.tensor(float(y.numel()), device=y.device)
    if y.numel() == 0:
        return torch.zeros(3, device=y.device)
    s = y.sum(dtype=torch.float32)
    sq = torch.linalg.vector_norm(y, dtype=torch.float32) ** 2
    return torch.stack([s, sq, n])


def saturated_count(y: torch.Tensor, kind: str) -> torch.Tensor:
    """Number of outputs in the flat tails of a sigmoid or tanh (see the thresholds above)."""
    y = y.detach()
    if kind == "sigmoid":
        tail = (y - 0.5).abs() >= (0.5 - SIGMOID_TAIL)
    else:
        tail = y.abs() >= TANH_TAIL
    return tail.sum(dtype=torch.float32)


def finish_activation(unit_max_v: torch.Tensor | None, mom: torch.Tensor, sat: torch.Tensor | None) -> torch.Tensor:
    """[dead_fraction, saturation, mean, std] from accumulated statistics (NaN where not applicable)."""
    device = mom.device
    nan = torch.tensor(float("nan"), device=device)
    if unit_max_v is not None and unit_max_v.numel():
        dead = (unit_max_v <= 0).to(torch.float32).mean()
    else:
        dead = nan
    count = mom[2].clamp_min(1.0)
    mean = mom[0] / count
    var = (mom[1] / count - mean * mean).clamp_min(0.0)
    # Population variance -> sample variance, as torch.std does.
    var = var * count / (count - 1).clamp_min(1.0)
    satv = sat / count if sat is not None else nan
    return torch.stack([dead, satv.reshape(()), mean, var.sqrt()])


def spread(v: torch.Tensor) -> torch.Tensor:
    """[min, p05, p25, p50, p75, p95, max] of a per-sample loss vector, float32."""
    v = v.detach().reshape(-1).to(torch.float32)
    if v.numel() == 0:
        return torch.full((2 + len(QUANTILES),), float("nan"), device=v.device)
    q = torch.quantile(v, torch.tensor(QUANTILES, device=v.device))
    return torch.cat([v.min().reshape(1), q, v.max().reshape(1)])


__all__ = [
    "SIGMOID_TAIL",
    "TANH_TAIL",
    "finish_activation",
    "grouped_norms",
    "max_abs",
    "moments",
    "nonfinite_counts",
    "saturated_count",
    "spread",
    "unit_dims",
    "unit_max",
    "_local",
]
