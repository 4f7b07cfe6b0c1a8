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


def _on_device(step: Any) -> bool:
    """Whether an optimizer's step count lives on an accelerator (capturable/fused Adam): reading it on
    the host would be a second synchronisation."""
    return isinstance(step, torch.Tensor) and step.device.type != "cpu"


def _factors(kept: list[tuple], device: torch.device) -> tuple[list[Any], torch.Tensor]:
    """Per tensor: thr = eps * sqrt(bc2) (floats, or 0-d device tensors when a step count is on the
    device) and sqrt(bc2) / bc1 as a float64 vector on `device` (NaN before the first update)."""
    if not any(_on_device(e[3]) for e in kept):
        host = [float(e[3]) for e in kept]
        root_bc2 = [math.sqrt(1.0 - e[5] ** t) if t >= 1 else math.nan for e, t in zip(kept, host)]
        thr = [e[6] * r for e, r in zip(kept, root_bc2)]
        scale = [r / (1.0 - e[4] ** t) if t >= 1 else math.nan for e, t, r in zip(kept, host, root_bc2)]
        return thr, torch.tensor(scale, dtype=torch.float64, device=device)
    t = torch.stack([torch.as_tensor(e[3]).reshape(()).to(device, torch.float64) for e in kept])
    beta1 = torch.tensor([e[4] for e in kept], dtype=torch.float64, device=device)
    beta2 = torch.tensor([e[5] for e in kept], dtype=torch.float64, device=device)
    eps = torch.tensor([e[6] for e in kept], dtype=torch.float64, device=device)
    root_bc2 = torch.where(t >= 1, (1.0 - beta2 ** t).clamp_min(0.0).sqrt(), torch.nan)
    scale = root_bc2 / (1.0 - beta1 ** t)
    thr = (eps * root_bc2).to(kept[0][1].dtype)
    return list(thr.unbind()), scale


# Tensors are processed in chunks of at most this many elements, so that the scratch space a
# logged step needs stays bounded (two chunks' worth) whatever the model's size.
_CHUNK_NUMEL = 1 << 22
# A big CPU tensor is read in blocks of this many elements (1 MB of float32): each block's few
# passes then run in cache, and the state is read from memory once.
_BLOCK_NUMEL = 1 << 18
# One flat scratch buffer per (dtype, size) is kept and reused on CPU: fresh ones page-fault on every
# logged step.
_cpu_scratch: dict[torch.dtype, torch.Tensor] = {}


def _cpu_buffer(dtype: torch.dtype, numel: int) -> torch.Tensor:
    """A CPU buffer of at least `numel` elements, kept for the next logged step (overwritten)."""
    buf = _cpu_scratch.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = _cpu_scratch[dtype] = torch.empty(numel, dtype=dtype)
    return buf


def _scratch(like: Sequence[torch.Tensor], count: int) -> list[list[torch.Tensor]]:
    """`count` lists of tensors shaped like `like` (one device and dtype), to be overwritten."""
    first = like[0]
    total = sum(t.numel() for t in like)
    if first.device.type != "cpu":
        return [[torch.empty_like(t) for t in like] for _ in range(count)]  # the caching allocator reuses them
    buf = _cpu_buffer(first.dtype, count * total)
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


def _blocked(m: torch.Tensor, v: torch.Tensor, thr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(-count of sqrt(v) < thr, sum of squares of m / (sqrt(v) + thr)) of a big contiguous float32/64
    CPU tensor, 1-element float64, block by block: m and v are read once, the other passes hit the cache."""
    buf = _cpu_buffer(m.dtype, 2 * _BLOCK_NUMEL)
    root, work = buf[:_BLOCK_NUMEL], buf[_BLOCK_NUMEL:]
    mf, vf = m.view(-1), v.view(-1)
    below, squares = [], []
    for a in range(0, mf.numel(), _BLOCK_NUMEL):
        vb, mb = vf[a:a + _BLOCK_NUMEL], mf[a:a + _BLOCK_NUMEL]
        r, w = root[:vb.numel()], work[:vb.numel()]
        torch.sqrt(vb, out=r)
        torch.sub(r, thr, out=w)
        w.sign_().clamp_max_(0.0)  # -1 where sqrt(v) < thr, 0 elsewhere
        below.append(w.sum())
        r.add_(thr)
        torch.div(mb, r, out=r)
        squares.append(torch.dot(r, r))
    return (torch.stack(below).to(torch.float64).sum().reshape(1),
            torch.stack(squares).to(torch.float64).sum().reshape(1))


def _blockable(m: torch.Tensor, v: torch.Tensor) -> bool:
    return (m.device.type == "cpu" and m.dtype in (torch.float32, torch.float64) and v.dtype == m.dtype
            and m.numel() >= _BLOCK_NUMEL and m.is_contiguous() and v.is_contiguous())


class _Entries:
    """`_adam_entries` kept between logged steps, with the plan of their state tensors.

    Adam creates a parameter's state once and updates it in place, so the entries are found again only
    when the parameter list, the optimizer, its state dict (`load_state_dict` replaces it), the number
    of parameters with state or the parameter groups change: a logged step then reads the state
    tensors without a Python loop over the parameters.
    """

    def __init__(self) -> None:
        self.key: Optional[tuple] = None
        self.params: Optional[Sequence[tuple[str, torch.Tensor]]] = None
        self.entries: list[tuple] = []
        self.planner = reductions.Planner()
        self.names: list[str] = []
        self.numel: Optional[torch.Tensor] = None  # float64, on the device of the first use
        self.hyper: Optional[tuple[torch.Tensor, ...]] = None

    def __call__(self, params: Sequence[tuple[str, torch.Tensor]], optimizer: torch.optim.Optimizer) -> list[tuple]:
        state = optimizer.state
        groups = tuple((id(g["params"]), len(g["params"]), g.get("betas"), g.get("eps"), g.get("amsgrad"))
                       for g in optimizer.param_groups)
        key = (id(optimizer), id(state), len(state), groups)
        if key != self.key or params is not self.params:
            self.key, self.params, self.entries = key, params, _adam_entries(params, optimizer)
            self.names = [e[0] for e in self.entries]
            self.numel = None
            self.hyper = None
        return self.entries

    def hyper_parameters(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(beta1, beta2, eps) per entry, float64 on `device` (made once per set of entries: the groups'
        betas and eps are part of the key)."""
        if self.hyper is None or self.hyper[0].device != device:
            self.hyper = tuple(torch.tensor([e[k] for e in self.entries], dtype=torch.float64, device=device)
                               for k in (4, 5, 6))
        return self.hyper

    def numels(self, device: torch.device) -> torch.Tensor:
        """Each entry's element count, float64 on `device` (made once per set of entries)."""
        if self.numel is None or self.numel.device != device:
            self.numel = _numels(self.entries, device)
        return self.numel


def _flat_adam(kept: list[tuple], plan: reductions.Plan, out_device: torch.device, entries: _Entries
               ) -> Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(-count of sqrt(v) < thr, sum of squares of m / (sqrt(v) + thr), sqrt(bc2) / bc1) per tensor,
    float64 on `out_device`, for many small state tensors ("flat" plan) whose step counts are 1-element
    tensors (of at least 1 where known on the host): m and v each copied into one buffer, a few passes
    over them, sums by segment. None where that does not apply (the caller's general path does)."""
    if plan.impl != "flat":
        return None
    try:  # one C++ call finds out whether every step count is a tensor of one shape
        counts = torch.stack([e[3] for e in kept]).reshape(-1)
    except (TypeError, RuntimeError):  # plain numbers, or shapes that differ
        return None
    if counts.numel() != len(kept):
        return None
    if counts.device.type == "cpu" and not bool((counts >= 1).all()):
        return None  # an entry with no update yet is left out: the general path knows how
    m = plan.flatten([e[1] for e in kept], slot=0)
    v = plan.flatten([e[2] for e in kept], slot=1)
    device = m.device
    t = counts.to(device, torch.float64)
    beta1, beta2, eps = entries.hyper_parameters(device)
    root_bc2 = torch.where(t >= 1, (1.0 - beta2 ** t).clamp_min(0.0).sqrt(), torch.nan)
    scale = (root_bc2 / (1.0 - beta1 ** t)).to(out_device)
    thr = (eps * root_bc2).to(m.dtype)[plan.segments]  # each element's own threshold
    root = v.sqrt()
    below = plan.segment_sums((root < thr).to(m.dtype))
    r = m / root.add_(thr)
    squares = plan.segment_sums(r.mul_(r))
    return -below.to(out_device, torch.float64), squares.to(out_device, torch.float64), scale


def adam_state(
    params: Sequence[tuple[str, torch.Tensor]], optimizer: Optional[torch.optim.Optimizer], out_device: torch.device,
    entries: Optional[_Entries] = None,
) -> list[tuple[str, list[str], torch.Tensor]]:
    """[(EPS_FRACTION, names, fractions), (UPDATE_RMS, names, rms)] for the parameters with Adam state
    (empty when there are none); device tensors, for the logged step's one host transfer.

    With sqrt(v_hat) = sqrt(v) / sqrt(bc2): sqrt(v_hat) < eps where sqrt(v) < thr = eps * sqrt(bc2), and
    the update m_hat / (sqrt(v_hat) + eps) = sqrt(bc2) / bc1 * m / (sqrt(v) + thr). Big CPU tensors are
    read block by block (`_blocked`); the others a dozen `torch._foreach_*` calls per chunk of one device
    and dtype. No boolean tensors: comparisons are slower than arithmetic on CPU. Many small tensors
    (a "flat" plan of their state, kept in `entries` between logged steps) are read as one (`_flat_adam`).
    """
    if optimizer is None:
        return []
    if entries is not None:
        found = entries(params, optimizer)
        if found:
            plan = entries.planner([e[1] for e in found], key=entries.key)
            flat = _flat_adam(found, plan, out_device, entries)
            if flat is not None:
                return _results(entries.names, *flat, entries.numels(out_device))
    else:
        found = _adam_entries(params, optimizer)
    # No update taken yet (a step count below 1, known on the host): no bias correction, nothing to record.
    kept = [e for e in found if _on_device(e[3]) or float(e[3]) >= 1]
    if not kept:
        return []
    m = [e[1] for e in kept]
    v = [e[2] for e in kept]
    thr, scale = _factors(kept, out_device)
    numels = [t.numel() for t in m]
    below_parts, square_parts, owners = [], [], []  # 1-D float64 pieces and the tensor of each element
    for idx in reductions.groups(m):
        big = [i for i in idx if _blockable(m[i], v[i]) and not isinstance(thr[i], torch.Tensor)]
        for i in big:
            below, squares = _blocked(m[i], v[i], thr[i])
            below_parts.append(below)
            square_parts.append(squares)
            owners.append(i)
        taken = set(big)
        for chunk in _chunks([i for i in idx if i not in taken], numels):
            root, work = _scratch([v[i] for i in chunk], 2)
            torch._foreach_copy_(root, [v[i] for i in chunk])
            torch._foreach_sqrt_(root)
            torch._foreach_copy_(work, root)
            torch._foreach_sub_(work, [thr[i] for i in chunk])
            torch._foreach_sign_(work)
            torch._foreach_clamp_max_(work, 0.0)  # -1 where sqrt(v) < thr, 0 elsewhere
            counts = torch.stack(torch._foreach_norm(work))  # L2^2 = count
            torch._foreach_add_(root, [thr[i] for i in chunk])
            torch._foreach_copy_(work, [m[i] for i in chunk])
            torch._foreach_div_(work, root)
            norms = torch.stack(torch._foreach_norm(work))
            below_parts.append(-(counts.to(torch.float64) ** 2))
            square_parts.append(norms.to(torch.float64) ** 2)
            owners += chunk
    at = torch.tensor(owners, device=out_device)
    below = torch.empty(len(kept), dtype=torch.float64, device=out_device)
    squares = torch.empty(len(kept), dtype=torch.float64, device=out_device)
    below[at] = torch.cat([t.to(out_device) for t in below_parts])
    squares[at] = torch.cat([t.to(out_device) for t in square_parts])
    return _results([e[0] for e in kept], below, squares, scale, _numels(kept, out_device))


def _numels(kept: list[tuple], device: torch.device) -> torch.Tensor:
    """Each entry's element count, float64 on `device`."""
    return torch.tensor([float(e[1].numel()) for e in kept], dtype=torch.float64, device=device)


def _results(names: list[str], below: torch.Tensor, squares: torch.Tensor, scale: torch.Tensor,
             numel: torch.Tensor) -> list[tuple[str, list[str], torch.Tensor]]:
    """The two metrics from each tensor's (-count below the threshold, sum of squares of the update),
    bias-correction factor sqrt(bc2) / bc1 and element count."""
    fractions = (-below).round() / numel
    rms = squares.sqrt() * scale / numel.sqrt()
    # Unknown is never a number: a NaN in the state (or no bias correction yet) makes both NaN.
    fractions = torch.where(scale.isnan() | squares.isnan(), torch.nan, fractions)
    return [(EPS_FRACTION, names, fractions.to(torch.float32)), (UPDATE_RMS, names, rms.to(torch.float32))]


class AdamState(Collector):
    """`adam_eps_fraction` and `update_rms` of the parameters with Adam state (not of shards: a shard's
    share of entries is not the tensor's)."""

    def __init__(self, params: Sequence[tuple[str, torch.Tensor]], optimizer: torch.optim.Optimizer) -> None:
        self.params = list(params)
        self.optimizer = optimizer
        self._entries = _Entries()

    def follow(self, params: Sequence[tuple[str, torch.Tensor]]) -> None:
        self.params = list(params)

    def parts(self, step: int) -> list[Part]:
        if self.ctx.sharded:
            return []
        return [Part(metric, names, values) for metric, names, values in
                adam_state(self.params, self.optimizer, self.ctx.device, self._entries)]
