"""Fused reductions over gradients, weights and activations.

Pure functions: tensors in, tensors out, no host transfer. They follow
`torch.nn.utils.clip_grad_norm_`: group by device and dtype, one fused
kernel per group, then stack. The caller concatenates everything a logged
step needs and moves it to the host once.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections import defaultdict
from typing import Callable, Optional, Sequence

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


def dense_values(t: torch.Tensor) -> torch.Tensor:
    """The stored values of a sparse gradient (nn.Embedding(sparse=True)), the tensor itself otherwise.

    After `coalesce` (duplicate indices summed) the values have the norm,
    the largest absolute value and the non-finite count of the dense tensor.
    """
    if t.layout == torch.strided:
        return t
    if t.layout == torch.sparse_coo:
        return t.coalesce().values()
    return t.to_dense()


def groups(tensors: Sequence[torch.Tensor]) -> list[list[int]]:
    """Indices of `tensors` grouped by (device, dtype), in first-seen order: one fused call per group."""
    out: dict[tuple, list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        out[(t.device, t.dtype)].append(i)
    return list(out.values())


# How a list of tensors is reduced (see `Plan`).
IMPLEMENTATIONS = ("flat", "stream", "foreach")
# "flat" below this many elements per tensor on average: reducing one kernel at a time is all
# per-call overhead there (benchmarks/RESULTS.md, "Targets missed, and why": the 2,000-tensor model).
FLAT_MAX_MEAN_NUMEL = 1024
# "stream" from this many elements per tensor on average: BLAS `dot` reads a CPU tensor once at
# memory speed, faster than `_foreach_norm` there; below it the Python loop of calls dominates.
STREAM_MIN_MEAN_NUMEL = 16384


# Each tensor's class (a DTensor is reduced by its shard), device, dtype, shape and storage layout.
_LAYOUT = operator.attrgetter("__class__", "device", "dtype", "shape", "layout")


def layout(tensors: Sequence[torch.Tensor]) -> tuple:
    """What a plan depends on: each tensor's class, device, dtype, shape and storage layout.

    One C-level attribute read per tensor (`map` of an `attrgetter`): it is checked on every logged
    step, so at thousands of tensors it must cost what a pointer read does, not a Python loop.
    """
    return tuple(map(_LAYOUT, tensors))


def fingerprint(tensors: Sequence[torch.Tensor]) -> tuple:
    """Each tensor's storage address: for parameters (the same objects from step to step), it moves
    whenever their dtype, device or shape can (`.to()`, `.half()`, `p.data = ...`), and costs one C-level
    call per tensor where `layout` builds a `torch.Size` and a `torch.device` per tensor."""
    return tuple(map(torch.Tensor.data_ptr, tensors))


def absent(items: Sequence[object]) -> list[int]:
    """Positions of the Nones in `items` (parameters' `.grad`), without a Python loop over them."""
    return list(itertools.compress(range(len(items)), map(operator.is_, items, itertools.repeat(None))))


GRAD = operator.attrgetter("grad")  # list(map(GRAD, params)): every parameter's .grad in one C-level pass


def _flat_possible(tensors: Sequence[torch.Tensor]) -> bool:
    """Two or more dense tensors of one floating dtype and device (not DTensors)."""
    if len(tensors) < 2:
        return False
    dtype, device = tensors[0].dtype, tensors[0].device
    return dtype.is_floating_point and all(
        t.dtype == dtype and t.device == device and t.layout == torch.strided and type(t).__name__ != "DTensor"
        for t in tensors
    )


def _stream_possible(tensors: Sequence[torch.Tensor]) -> bool:
    """Non-empty contiguous float32/float64 CPU tensors, all of one dtype."""
    if not tensors:
        return False
    dtype = tensors[0].dtype
    return dtype in (torch.float32, torch.float64) and all(
        t.device.type == "cpu" and t.dtype == dtype and t.layout == torch.strided and t.is_contiguous()
        and t.numel() for t in tensors
    )


def choose(tensors: Sequence[torch.Tensor], impl: Optional[str] = None) -> str:
    """The implementation for `tensors`: `impl` where it applies to them, else the fastest that does."""
    if impl is not None and impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {IMPLEMENTATIONS} or None, got {impl!r}")
    flat, stream = _flat_possible(tensors), _stream_possible(tensors)
    if impl is not None:
        return impl if impl == "foreach" or (flat if impl == "flat" else stream) else "foreach"
    total = sum(t.numel() for t in tensors)
    if flat and total <= FLAT_MAX_MEAN_NUMEL * len(tensors):
        return "flat"
    if stream and total >= STREAM_MIN_MEAN_NUMEL * len(tensors):
        return "stream"
    return "foreach"


class Plan:
    """How the norms (and largest absolute values) of one list of tensors are computed, chosen once
    per layout (as `torch.optim.adam` picks single-tensor, foreach or fused in one place):

    - "flat": many small tensors are copied into one buffer (one C++ call) and reduced by segment;
    - "stream": each CPU tensor is read once by BLAS `dot`, its `aminmax` taken while it is in cache;
    - "foreach": one `torch._foreach_norm` per (device, dtype) group, as `clip_grad_norm_`.

    `impl` forces one where it applies (tests, benchmarks); "foreach" always does.
    """

    def __init__(self, tensors: Sequence[torch.Tensor], impl: Optional[str] = None, key: Optional[tuple] = None):
        self.layout = layout(tensors) if key is None else key
        self.impl = choose(tensors, impl)
        self.n = len(tensors)
        self.groups = groups(tensors)
        self.segments: Optional[torch.Tensor] = None  # "flat": the tensor of each element of `flatten`'s buffer
        self._flat: dict[int, torch.Tensor] = {}  # slot: buffer
        if self.impl == "flat":
            self._stack_groups(tensors)
        self._index: dict[torch.device, list[torch.Tensor]] = {}  # group positions, per output device

    def _stack_groups(self, tensors: Sequence[torch.Tensor]) -> None:
        """The shape groups `flatten` stacks: (picker of the group's tensors or None for all, buffer range,
        stacked shape), and the segment ids of the buffer's elements in that order."""
        by_shape: dict[tuple, list[int]] = defaultdict(list)
        for i, t in enumerate(tensors):
            by_shape[tuple(t.shape)].append(i)
        self._stacks, order, start = [], [], 0
        for shape, idx in by_shape.items():
            numel = math.prod(shape)
            pick = None if len(by_shape) == 1 else operator.itemgetter(*idx)
            self._stacks.append((pick, start, start + numel * len(idx), (len(idx), *shape)))
            order += idx
            start += numel * len(idx)
        self._total = start
        device = tensors[0].device
        numels = torch.tensor([tensors[i].numel() for i in order], device=device)
        # output_size: on a GPU, repeat_interleave would otherwise sync to learn it.
        self.segments = torch.repeat_interleave(torch.tensor(order, device=device), numels, output_size=start)
        # Where each tensor's row of the groups' results is: none needed when the groups keep the tensors' order.
        self._inverse = None if order == list(range(len(order))) else torch.argsort(torch.tensor(order, device=device))

    def _per_tensor(self, values: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """`reduce` of each tensor's elements in a buffer laid out as `flatten`'s: each shape group viewed as
        [tensors x elements] and reduced along its rows (a vectorised reduction, where a scatter by segment
        index is several times slower on CPU), in the tensors' order. Empty tensors give 0."""
        rows = []
        for _, start, stop, shape in self._stacks:
            count, numel = shape[0], (stop - start) // shape[0]
            block = values[start:stop].view(count, numel)
            rows.append(reduce(block) if numel else values.new_zeros(count))
        out = rows[0] if len(rows) == 1 else torch.cat(rows)
        return out if self._inverse is None else out.index_select(0, self._inverse)

    def segment_sums(self, values: torch.Tensor) -> torch.Tensor:
        """Sum of each tensor's elements of `values` (laid out as `flatten`'s buffer), in the tensors' order."""
        return self._per_tensor(values, lambda block: block.sum(1))

    def segment_norms(self, flat: torch.Tensor, out_device: torch.device) -> torch.Tensor:
        """L2 norm of each tensor of a buffer laid out as `flatten`'s, float32 (0 for an empty one); NaN and
        inf propagate."""
        x = flat.to(torch.float32)
        return self.segment_sums(x * x).sqrt().to(out_device)

    def segment_max_abs(self, flat: torch.Tensor, out_device: torch.device) -> torch.Tensor:
        """Largest |x| of each tensor of a buffer laid out as `flatten`'s, float32 (0 for an empty one); NaN
        propagates."""
        return self._per_tensor(flat.abs().to(torch.float32), lambda block: block.amax(1)).to(out_device)

    def flatten(self, tensors: Sequence[torch.Tensor], slot: int = 0) -> torch.Tensor:
        """Every element of `tensors` in one 1-D buffer ("flat" plans), which the plan keeps per `slot` (no
        page faults, nothing rebuilt). Tensors of one shape are stacked together (`torch.stack(out=)`:
        one copy kernel for the group, where a copy per tensor costs several times more at thousands of
        tiny tensors), so the buffer holds them by shape group: `self.segments` says whose each element
        is, and two buffers of one plan layout line up. The next call with the same slot overwrites it."""
        buf = self._flat.get(slot)
        if buf is None:
            first = tensors[0]
            buf = self._flat[slot] = torch.empty(self._total, dtype=first.dtype, device=first.device)
        with torch.no_grad():  # out= refuses tensors that require grad (parameters outside no_grad)
            for pick, start, stop, shape in self._stacks:
                group = pick(tensors) if pick is not None else tensors
                torch.stack(group if isinstance(group, (list, tuple)) else (group,), out=buf[start:stop].view(shape))
        return buf

    def _positions(self, out_device: torch.device) -> list[torch.Tensor]:
        index = self._index.get(out_device)
        if index is None:
            index = self._index[out_device] = [torch.tensor(idx, device=out_device) for idx in self.groups]
        return index

    def norms(
        self, tensors: Sequence[torch.Tensor], out_device: torch.device
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(L2 norm of each tensor, float32 on `out_device`; the flat copy they were taken from, or None).
        Empty tensors have norm 0; NaN and inf propagate."""
        if not tensors:
            return torch.zeros(0, device=out_device), None
        if self.impl == "flat":
            flat = self.flatten(tensors)
            return self.segment_norms(flat, out_device), flat
        if self.impl == "stream":
            return torch.stack([_sum_of_squares(t) for t in tensors]).sqrt().to(out_device, torch.float32), None
        if len(self.groups) == 1:  # the usual case: no scatter, no index tensor
            return torch.stack(torch._foreach_norm(list(tensors))).to(out_device, torch.float32), None
        out = torch.empty(self.n, dtype=torch.float32, device=out_device)
        for idx, at in zip(self.groups, self._positions(out_device)):
            out[at] = torch.stack(torch._foreach_norm([tensors[i] for i in idx])).to(out_device, torch.float32)
        return out, None

    def norms_and_max_abs(
        self, tensors: Sequence[torch.Tensor], out_device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(L2 norm, largest absolute element) of each tensor, float32 on `out_device` (0 for empty ones)."""
        if not tensors:
            return torch.zeros(0, device=out_device), torch.zeros(0, device=out_device)
        if self.impl == "flat":
            flat = self.flatten(tensors)
            return self.segment_norms(flat, out_device), self.segment_max_abs(flat, out_device)
        if self.impl == "stream":  # both reductions of a tensor back to back: the second reads it from cache
            squares, lows, highs = [], [], []
            for t in tensors:
                squares.append(_sum_of_squares(t))
                lo, hi = torch.aminmax(t)
                lows.append(lo)
                highs.append(hi)
            norms = torch.stack(squares).sqrt().to(out_device, torch.float32)
            return norms, torch.maximum(torch.stack(highs), -torch.stack(lows)).to(out_device, torch.float32)
        return self.norms(tensors, out_device)[0], self._max_abs(tensors, out_device)

    def _max_abs(self, tensors: Sequence[torch.Tensor], out_device: torch.device) -> torch.Tensor:
        # One `aminmax` per tensor: on CPU `_foreach_norm(ord=inf)` is many times slower.
        def group_max(idx: list[int]) -> torch.Tensor:
            if tensors[idx[0]].is_complex():
                return torch.stack([tensors[i].abs().amax() for i in idx]).to(out_device, torch.float32)
            lo_hi = [torch.aminmax(tensors[i]) for i in idx]
            lows = torch.stack([lo for lo, _ in lo_hi]).to(out_device, torch.float32)
            highs = torch.stack([hi for _, hi in lo_hi]).to(out_device, torch.float32)
            return torch.maximum(highs, -lows)

        if len(self.groups) == 1 and all(t.numel() for t in tensors):  # the usual case: no scatter
            return group_max(self.groups[0])
        out = torch.zeros(self.n, dtype=torch.float32, device=out_device)
        for idx in self.groups:
            idx = [i for i in idx if tensors[i].numel()]
            if idx:
                out[torch.tensor(idx, device=out_device)] = group_max(idx)
        return out

    def subtract_norms_(self, buffers: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                        out_device: torch.device) -> torch.Tensor:
        """`buffers[i] -= values[i]` in place, then the L2 norm of each buffer (the plan is the buffers')."""
        if self.impl == "stream" and _stream_possible(values):  # each norm while its difference is in cache
            squares = []
            for b, v in zip(buffers, values):
                b.sub_(v)
                squares.append(_sum_of_squares(b))
            return torch.stack(squares).sqrt().to(out_device, torch.float32)
        torch._foreach_sub_(list(buffers), list(values))
        return self.norms(buffers, out_device)[0]


class Planner:
    """The plan of the tensors it is given, made again only when their layout changes."""

    def __init__(self, impl: Optional[str] = None) -> None:
        choose([], impl)  # a bad name fails here, not on a logged step
        self.impl = impl
        self._plan: Optional[Plan] = None

    def __call__(self, tensors: Sequence[torch.Tensor], key: Optional[tuple] = None) -> Plan:
        """The plan of `tensors`; `key`: a cheaper stand-in for `layout(tensors)` that the caller knows
        changes whenever it does (`fingerprint` of parameters, whose gradients follow their layout)."""
        key = layout(tensors) if key is None else key
        if self._plan is None or self._plan.layout != key:
            self._plan = Plan(tensors, self.impl, key)
        return self._plan


def _sum_of_squares(t: torch.Tensor) -> torch.Tensor:
    # dot(x, x) (BLAS) reads x once at memory speed; float32 error ~1e-6; inf and NaN alike.
    flat = t.reshape(-1)  # a view, unless the tensor became non-contiguous since its plan was made
    return torch.dot(flat, flat)


def grouped_norms(
    tensors: Sequence[torch.Tensor], out_device: torch.device, impl: Optional[str] = None
) -> torch.Tensor:
    """L2 norm of each tensor as a float32 vector on `out_device` (a one-off `Plan`)."""
    return Plan(tensors, impl).norms(tensors, out_device)[0]


def max_abs(tensors: Sequence[torch.Tensor], out_device: torch.device, impl: Optional[str] = None) -> torch.Tensor:
    """Largest absolute element of each tensor (0 for empty ones), float32 on `out_device`; NaN propagates."""
    return Plan(tensors, impl).norms_and_max_abs(tensors, out_device)[1]


def norms_and_max_abs(
    tensors: Sequence[torch.Tensor], out_device: torch.device, impl: Optional[str] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(`grouped_norms`, `max_abs`) of the same tensors (a one-off `Plan`)."""
    return Plan(tensors, impl).norms_and_max_abs(tensors, out_device)


def subtract_norms_(
    buffers: Sequence[torch.Tensor], values: Sequence[torch.Tensor], out_device: torch.device,
    impl: Optional[str] = None,
) -> torch.Tensor:
    """`buffers[i] -= values[i]` in place, then the L2 norm of each buffer (a one-off `Plan`)."""
    return Plan(buffers, impl).subtract_norms_(buffers, values, out_device)


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


def unit_max(y: torch.Tensor, stacked: bool = False) -> torch.Tensor:
    """Per-unit maximum over the batch, float32, flattened ([G, units] for `stacked` outputs [G, ...]).

    A unit is dead for a batch when this is <= 0: no sample made it positive.
    Float `amax` is used instead of boolean comparisons, which are slower on CPU.
    """
    lead = 1 if stacked else 0
    dims = tuple(d + lead for d in unit_dims(y.ndim - lead))
    m = y.amax(dim=dims) if dims else y
    m = m.detach().to(torch.float32)
    return m.reshape(y.shape[0], -1) if stacked else m.reshape(-1)


def moments(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, L2 norm) of all elements, float32 0-d tensors, no large temporaries."""
    y = y.detach()
    norm_dtype = torch.float32 if y.dtype != torch.float64 else None  # vector_norm refuses to narrow float64
    return y.sum(dtype=torch.float32), torch.linalg.vector_norm(y, dtype=norm_dtype).float()


def saturated_count(y: torch.Tensor, kind: str, dim: Optional[int] = None) -> torch.Tensor:
    """Number of outputs in the flat tails of a sigmoid or tanh (see the thresholds above), over `dim` or all."""
    y = y.detach()
    if kind == "sigmoid":
        tail = (y - 0.5).abs() >= (0.5 - SIGMOID_TAIL)
    else:
        tail = y.abs() >= TANH_TAIL
    return tail.sum(dtype=torch.float32) if dim is None else tail.sum(dim=dim, dtype=torch.float32)


def activation_rows(
    unit_max_flat: torch.Tensor,
    unit_counts: Sequence[int],
    relu_sites: Sequence[int],
    sums: torch.Tensor,
    squares: torch.Tensor,
    counts: torch.Tensor,
    saturated: torch.Tensor,
    saturation_sites: Sequence[int],
) -> torch.Tensor:
    """[dead_fraction, saturation, mean, std] for each of S sites, as an [S, 4] float32 tensor.

    `unit_max_flat` holds the per-unit maxima of the `relu_sites`, one block of
    `unit_counts[k]` values per site; `sums`, `squares` (sums of squares),
    `counts` and `saturated` are [S]. A few vectorised ops whatever S is.
    NaN where a statistic does not apply (dead units of a sigmoid, say), and
    every statistic NaN for a site whose outputs were not all finite.
    """
    S = counts.numel()
    device = counts.device
    dead = torch.full((S,), float("nan"), device=device)
    if relu_sites:
        lengths = torch.tensor(list(unit_counts), device=device)
        # output_size: on a GPU, repeat_interleave would otherwise sync to learn it.
        seg = torch.repeat_interleave(
            torch.arange(len(relu_sites), device=device), lengths, output_size=unit_max_flat.numel()
        )
        dead_units = torch.zeros(len(relu_sites), device=device).index_add_(
            0, seg, (unit_max_flat <= 0).to(torch.float32)
        )
        dead[torch.tensor(list(relu_sites), device=device)] = dead_units / lengths.clamp_min(1)
    n = counts.clamp_min(1.0)
    mean = sums / n
    var = (squares / n - mean * mean).clamp_min(0.0)
    var = var * n / (n - 1).clamp_min(1.0)  # population -> sample variance, as torch.std
    sat = torch.full((S,), float("nan"), device=device)
    if saturation_sites:
        idx = torch.tensor(list(saturation_sites), device=device)
        sat[idx] = saturated[idx] / n[idx]
    rows = torch.stack([dead, sat, mean, var.sqrt()], dim=1)
    # Unknown is never zero: NaN compares false, so a site with a NaN/Inf output read 0 % dead.
    # The sum of its outputs is non-finite exactly then (or when finite ones overflow it).
    return rows.masked_fill(~torch.isfinite(sums)[:, None], float("nan"))


def spread(v: torch.Tensor) -> torch.Tensor:
    """[min, p05, p25, p50, p75, p95, max] of a per-sample loss vector, float32.

    Linear interpolation between order statistics, as `torch.quantile` and
    `numpy.quantile` do by default, but with the positions computed on the
    host (`torch.quantile` checks its `q` on the device, a sync on a GPU).
    Any NaN makes every entry NaN, as with `torch.quantile`.
    """
    v = v.detach().reshape(-1).to(torch.float32)
    n = v.numel()
    if n == 0:
        return torch.full((2 + len(QUANTILES),), float("nan"), device=v.device)
    ordered = torch.sort(v).values
    lo_idx, hi_idx, frac = [], [], []
    for q in QUANTILES:
        pos = (n - 1) * q
        lo = int(pos)
        lo_idx.append(lo)
        hi_idx.append(min(lo + 1, n - 1))
        frac.append(pos - lo)
    lo_v, hi_v = ordered[lo_idx], ordered[hi_idx]
    weight = torch.tensor(frac, dtype=torch.float32, device=v.device)
    quantiles = lo_v + (hi_v - lo_v) * weight
    # Between an infinite and a finite value the limit is the infinity (inf - inf would make NaN);
    # with no interpolation needed, the order statistic itself.
    quantiles = torch.where(torch.isinf(hi_v) & (weight > 0), hi_v, quantiles)
    quantiles = torch.where(torch.isinf(lo_v) | (weight == 0), lo_v, quantiles)
    out = torch.cat([ordered[:1], quantiles, ordered[-1:]])
    return torch.where(torch.isnan(v).any(), torch.full_like(out, float("nan")), out)


__all__ = [
    "SIGMOID_TAIL",
    "TANH_TAIL",
    "activation_rows",
    "absent",
    "dense_values",
    "fingerprint",
    "Plan",
    "Planner",
    "choose",
    "grouped_norms",
    "groups",
    "max_abs",
    "moments",
    "nonfinite_counts",
    "norms_and_max_abs",
    "saturated_count",
    "spread",
    "subtract_norms_",
    "unit_dims",
    "unit_max",
    "_local",
]
