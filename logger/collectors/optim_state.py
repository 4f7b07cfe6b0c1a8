"""What the optimizer knows: its hyper-parameters (for the structure document) and Adam's state.

`adam_eps_fraction` is the share of a tensor's entries where sqrt(v_hat) < eps:
there eps, not the gradient's scale, sets the step size. `update_rms` is the
RMS of Adam's update direction m_hat / (sqrt(v_hat) + eps), without the
learning rate: about 1 for a consistent gradient sign, well below 1 where
noise dominates or eps swamps the update. Both are read from
`optimizer.state[p]` (`exp_avg`, `exp_avg_sq` or `max_exp_avg_sq` with
`amsgrad`, `step`) and the group's `betas` and `eps` on logged steps only,
before `optimizer.step()`: the state of the update before it. Any optimizer
whose state has those entries counts as Adam-family (Adam, AdamW, NAdam,
RAdam...); others record nothing.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
from torch import nn

from tb_diag_logger import reductions
from tb_diag_logger.collectors import Collector, Part
from tb_diag_plugin import metadata

GRAD_MISSING, EPS_FRACTION, UPDATE_RMS = metadata.PARAM_OPTIMIZER_METRICS
HYPER_PARAMETERS = ("lr", "weight_decay", "eps", "betas", "momentum")


def _number(v: Any) -> Any:
    """A JSON-able float (or list of floats) from a hyper-parameter that may be a tensor; None if not a number."""
    if isinstance(v, (tuple, list)):
        out = [_number(x) for x in v]
        return None if any(x is None for x in out) else out
    try:
        f = float(v)
    except (TypeError, ValueError, RuntimeError):
        return None
    return f if math.isfinite(f) else str(f)  # JSON has no NaN/inf: "nan", "inf"


def optimizer_doc(optimizer: Optional[torch.optim.Optimizer], model: nn.Module) -> Optional[dict]:
    """``{"class", "groups": [{lr, weight_decay, eps, betas, momentum, params}]}`` (keys only where the
    optimizer has them; params as qualified names of the model), or None without an optimizer."""
    if optimizer is None:
        return None
    names = {id(p): n for n, p in model.named_parameters()}
    groups = []
    for g in optimizer.param_groups:
        entry: dict[str, Any] = {}
        for key in HYPER_PARAMETERS:
            if key in g and (value := _number(g[key])) is not None:
                entry[key] = value
        entry["params"] = [names[id(p)] for p in g["params"] if id(p) in names]
        groups.append(entry)
    return {"class": type(optimizer).__name__, "groups": groups}


def optimizer_params(optimizer: Optional[torch.optim.Optimizer]) -> Optional[set[int]]:
    """ids of the parameters the optimizer holds, or None without an optimizer."""
    if optimizer is None:
        return None
    return {id(p) for g in optimizer.param_groups for p in g["params"]}


def _adam_entries(params: Sequence[tuple[str, torch.Tensor]], optimizer: torch.optim.Optimizer) -> list[tuple]:
    """(name, exp_avg, second moment, step, beta1, beta2, eps) of the parameters with Adam state."""
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    out = []
    for name, p in params:
        g = group_of.get(id(p))
        state = optimizer.state.get(p) if g is not None else None
        if not state or "betas" not in g or "eps" not in g:
            continue
        m, step = state.get("exp_avg"), state.get("step")
        v = state.get("max_exp_avg_sq") if g.get("amsgrad") else None
        v = state.get("exp_avg_sq") if v is None else v
        if not (isinstance(m, torch.Tensor) and isinstance(v, torch.Tensor) and step is not None):
            continue
        if type(m).__name__ == "DTensor" or not m.is_floating_point() or m.shape != v.shape or m.numel() == 0:
            continue  # a shard's share of entries is not the tensor's
        beta1, beta2 = (float(b) for b in g["betas"])
        out.append((name, m, v, step, beta1, beta2, float(g["eps"])))
    return out


def _host_steps(steps: list[Any]) -> list[float]:
    """Step counts as floats: numbers and CPU tensors directly, device tensors in one transfer."""
    on_device = [i for i, s in enumerate(steps) if isinstance(s, torch.Tensor) and s.device.type != "cpu"]
    skip = set(on_device)
    out = [0.0 if i in skip else float(s) for i, s in enumerate(steps)]
    if on_device:  # capturable/fused Adam keeps `step` on the device
        moved = torch.stack([steps[i].reshape(()).float() for i in on_device]).cpu().tolist()
        for i, value in zip(on_device, moved):
            out[i] = value
    return out


# Tensors are processed in chunks of at most this many elements, so that the scratch space a
# logged step needs stays bounded (two chunks' worth) whatever the model's size.
_CHUNK_NUMEL = 1 << 22
# On CPU, fresh scratch tensors page-fault on every logged step (a 4M-parameter MLP: 47 ms
# instead of ~25, PERF_NOTES.md); one flat buffer per dtype is kept and reused there.
_cpu_scratch: dict[torch.dtype, torch.Tensor] = {}


def _scratch(like: Sequence[torch.Tensor], count: int) -> list[list[torch.Tensor]]:
    """`count` lists of tensors shaped like `like` (one device and dtype), to be overwritten."""
    first = like[0]
    total = sum(t.numel() for t in like)
    if first.device.type != "cpu":
        return [[torch.empty_like(t) for t in like] for _ in range(count)]  # the caching allocator reuses them
    buf = _cpu_scratch.get(first.dtype)
    if buf is None or buf.numel() < count * total:
        buf = _cpu_scratch[first.dtype] = torch.empty(count * total, dtype=first.dtype)
    out, offset = [], 0
    for _ in range(count):
        views = []
        for t in like:
            views.append(buf[offset:offset + t.numel()].view(t.shape))
            offset += t.numel()
        out.append(views)
    return out


def _chunks(idx: list[int], numels: list[int]) -> list[list[int]]:
    """`idx` split into runs of at most `_CHUNK_NUMEL` elements (a bigger tensor alone)."""
    out: list[list[int]] = []
    size = 0
    for i in idx:
        if not out or size + numels[i] > _CHUNK_NUMEL:
            out.append([])
            size = 0
        out[-1].append(i)
        size += numels[i]
    return out


def adam_state(
    params: Sequence[tuple[str, torch.Tensor]], optimizer: Optional[torch.optim.Optimizer], out_device: torch.device
) -> list[tuple[str, list[str], torch.Tensor]]:
    """[(EPS_FRACTION, names, fractions), (UPDATE_RMS, names, rms)] for the parameters with Adam state
    (empty when there are none); device tensors, for the logged step's one host transfer.

    A dozen `torch._foreach_*` calls per chunk of tensors of one device and
    dtype, on two scratch copies of the chunk (no boolean tensors: slow on
    CPU, PERF_NOTES.md).
    """
    if optimizer is None:
        return []
    entries = _adam_entries(params, optimizer)
    steps = _host_steps([e[3] for e in entries])
    kept = [(e, t) for e, t in zip(entries, steps) if t >= 1]  # no update taken yet: no bias correction
    if not kept:
        return []
    names = [e[0] for e, _ in kept]
    m = [e[1] for e, _ in kept]
    v = [e[2] for e, _ in kept]
    eps = [e[6] for e, _ in kept]
    inv_bc1 = [1.0 / (1.0 - e[4] ** t) for e, t in kept]
    inv_root_bc2 = [1.0 / math.sqrt(1.0 - e[5] ** t) for e, t in kept]
    numels = [t.numel() for t in m]
    below = torch.empty(len(kept), dtype=torch.float32, device=out_device)
    norms = torch.empty(len(kept), dtype=torch.float32, device=out_device)
    for idx in reductions.groups(m):
        for chunk in _chunks(idx, numels):
            root, work = _scratch([v[i] for i in chunk], 2)
            torch._foreach_copy_(root, [v[i] for i in chunk])
            torch._foreach_sqrt_(root)
            torch._foreach_mul_(root, [inv_root_bc2[i] for i in chunk])  # sqrt(v_hat)
            torch._foreach_copy_(work, root)
            torch._foreach_sub_(work, [eps[i] for i in chunk])  # negative exactly where sqrt(v_hat) < eps
            torch._foreach_sign_(work)
            torch._foreach_clamp_max_(work, 0.0)  # -1 there, 0 elsewhere (NaN stays NaN)
            counts = torch.stack(torch._foreach_norm(work)).to(out_device, torch.float32)  # L2^2 = count
            torch._foreach_add_(root, [eps[i] for i in chunk])  # the update's denominator
            torch._foreach_copy_(work, [m[i] for i in chunk])
            torch._foreach_div_(work, root)  # m / (sqrt(v_hat) + eps); 1 / bc1 is applied to the norm
            at = torch.tensor(chunk, device=out_device)
            below[at] = counts * counts
            norms[at] = torch.stack(torch._foreach_norm(work)).to(out_device, torch.float32)
    numel = torch.tensor([float(n) for n in numels], device=out_device)
    fractions = below.round() / numel
    rms = norms * torch.tensor(inv_bc1, device=out_device) / numel.sqrt()
    return [(EPS_FRACTION, names, fractions), (UPDATE_RMS, names, rms)]


class AdamState(Collector):
    """`adam_eps_fraction` and `update_rms` of the parameters with Adam state (not of shards: a shard's
    share of entries is not the tensor's)."""

    def __init__(self, params: Sequence[tuple[str, torch.Tensor]], optimizer: torch.optim.Optimizer) -> None:
        self.params = list(params)
        self.optimizer = optimizer

    def parts(self, step: int) -> list[Part]:
        if self.ctx.sharded:
            return []
        return [Part(metric, names, values) for metric, names, values in
                adam_state(self.params, self.optimizer, self.ctx.device)]
