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


def adam_state(
    params: Sequence[tuple[str, torch.Tensor]], optimizer: Optional[torch.optim.Optimizer], out_device: torch.device
) -> list[tuple[str, list[str], torch.Tensor]]:
    """[(EPS_FRACTION, names, fractions), (UPDATE_RMS, names, rms)] for the parameters with Adam state
    (empty when there are none); device tensors, for the logged step's one host transfer.

    A few `torch._foreach_*` calls per (device, dtype) group, on two scratch
    copies of the second moments (no boolean tensors: slow on CPU, PERF_NOTES.md).
    """
    if optimizer is None:
        return []
    entries = _adam_entries(params, optimizer)
    steps = _host_steps([e[3] for e in entries])
    entries = [(e, s) for e, s in zip(entries, steps) if s >= 1]  # no update taken yet: no bias correction
    if not entries:
        return []
    fractions = torch.empty(len(entries), dtype=torch.float32, device=out_device)
    rms = torch.empty(len(entries), dtype=torch.float32, device=out_device)
    groups: dict[tuple, list[int]] = {}
    for i, ((_, m, _, _, _, _, _), _) in enumerate(entries):
        groups.setdefault((m.device, m.dtype), []).append(i)
    for idx in groups.values():
        m = [entries[i][0][1] for i in idx]
        v = [entries[i][0][2] for i in idx]
        eps = [entries[i][0][6] for i in idx]
        bc1 = [1.0 - entries[i][0][4] ** entries[i][1] for i in idx]
        bc2 = [1.0 - entries[i][0][5] ** entries[i][1] for i in idx]
        numel = torch.tensor([float(t.numel()) for t in m], device=out_device)
        root = torch._foreach_sqrt(v)
        torch._foreach_mul_(root, [1.0 / math.sqrt(b) for b in bc2])  # sqrt(v_hat)
        scratch = torch._foreach_sub(root, eps)  # negative exactly where sqrt(v_hat) < eps
        torch._foreach_sign_(scratch)
        torch._foreach_clamp_max_(scratch, 0.0)  # -1 there, 0 elsewhere (NaN stays NaN)
        below = torch.stack(torch._foreach_norm(scratch, 1)).to(out_device, torch.float32)
        torch._foreach_add_(root, eps)  # the update's denominator
        torch._foreach_copy_(scratch, m)
        torch._foreach_div_(scratch, root)  # m / (sqrt(v_hat) + eps); 1 / bc1 is applied to the norm
        norms = torch.stack(torch._foreach_norm(scratch)).to(out_device, torch.float32)
        at = torch.tensor(idx, device=out_device)
        fractions[at] = below / numel
        rms[at] = norms * torch.tensor([1.0 / b for b in bc1], device=out_device) / numel.sqrt()
    names = [e[0][0] for e in entries]
    return [(EPS_FRACTION, names, fractions), (UPDATE_RMS, names, rms)]
