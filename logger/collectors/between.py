"""What happens between logged steps (issue 22): accumulators updated at every `step()`, read when logged.

At every `step()` a few one-element device tensors are updated in place,
with no host synchronisation (no `.item()`, no data-dependent branch): the
largest and smallest loss passed as ``loss=``, the largest global gradient
norm, and the first step whose loss or gradient norm is not finite. A
logged step reads them in its one device-to-host copy and starts them
again, so a spike or the first NaN on a step that is not logged is seen,
with its step. The window is the steps after the previous logged step up
to and including this one.

The global gradient norm is the ``grad_norm=`` passed to `step()` (what
``clip_grad_norm_`` returns: free); without it, it is measured here only
when ``measure_grad_norm`` is on (one fused pass over the gradients per
step, see benchmarks/RESULTS.md "Between logged steps"), else it is NaN
(not measured), and only the loss counts for `nonfinite_first_step`. Under
a ``GradScaler`` non-finite gradient norms are the scaler's business (it
skips those steps): they count neither as the largest norm nor as the
first non-finite step.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence, Union

import torch

from tb_diag_logger import reductions
from tb_diag_logger.collectors import Collector, Part
from tb_diag_plugin import metadata

GRAD_NORM_MAX = metadata.METRICS["grad_norm_max_between"].name
LOSS_MAX = metadata.METRICS["loss_max_between"].name
LOSS_MIN = metadata.METRICS["loss_min_between"].name
NONFINITE_FIRST = metadata.METRICS["nonfinite_first_step"].name


def _state(value: float, device: torch.device) -> torch.Tensor:
    # float64 keeps step numbers exact past 2**24 (MPS has no float64).
    dtype = torch.float32 if device.type == "mps" else torch.float64
    return torch.full((1,), value, dtype=dtype, device=device)


class BetweenSteps(Collector):
    """`loss_max_between`, `loss_min_between`, `grad_norm_max_between`, `nonfinite_first_step`."""

    def __init__(self, params: Sequence[tuple[str, torch.Tensor]], measure_grad_norm: bool, amp: Any = None,
                 on_error: Optional[Callable[[str, BaseException], None]] = None) -> None:
        """`params`: the (name, parameter) pairs whose gradients make the global norm; `amp`: the `AmpState`
        of a GradScaler (it unscales a measured norm; non-finite gradients are its skipped steps);
        `on_error`: where a failure of `on_step` goes (training goes on)."""
        self._on_error = on_error
        self._params = [p for _, p in params]
        self._measure = measure_grad_norm
        self._amp = amp
        self._plan = reductions.Planner()  # made again only when the gradients' layout changes
        self._reset()

    def on_step(self, step: int) -> None:
        """Fed at every `step()` through the collector interface, with the step's loss and `grad_norm=`."""
        try:
            self.observe(step, self.ctx.total_loss, self.ctx.grad_norm)
        except Exception as e:
            if self._on_error is None:
                raise
            self._on_error("wiring checks", e)

    def _reset(self) -> None:
        # Device accumulators (created on first use, on the loss's / gradients' device) and host ones
        # for losses and norms given as Python numbers.
        self._loss_max: Optional[torch.Tensor] = None
        self._loss_min: Optional[torch.Tensor] = None
        self._norm_max: Optional[torch.Tensor] = None
        self._first: Optional[torch.Tensor] = None  # +inf: none yet
        self._host_loss: Optional[tuple[float, float]] = None
        self._host_norm = -math.inf
        self._host_first = math.inf
        self._norm_seen = False

    def observe(self, step: int, loss: Optional[Union[torch.Tensor, float]], grad_norm: Any) -> None:
        """One step's loss (``loss=``) and global gradient norm (``grad_norm=``, or measured): no sync."""
        if loss is not None:
            self._observe_loss(step, loss)
        norm = grad_norm
        if norm is None and self._measure:
            norm = self._global_norm()
        if norm is not None:
            self._observe_norm(step, norm)

    def _observe_loss(self, step: int, loss: Union[torch.Tensor, float]) -> None:
        if not isinstance(loss, torch.Tensor):
            lo, hi = self._host_loss or (math.inf, -math.inf)
            if not math.isnan(loss):
                self._host_loss = (min(lo, loss), max(hi, loss))
            elif self._host_loss is None:
                self._host_loss = (lo, hi)
            if not math.isfinite(loss):
                self._host_first = min(self._host_first, step)
            return
        v = reductions._local(loss).detach().reshape(1)
        if self._loss_max is None:
            self._loss_max = _state(-math.inf, v.device)
            self._loss_min = _state(math.inf, v.device)
        v = v.to(self._loss_max.dtype)
        torch.fmax(self._loss_max, v, out=self._loss_max)  # fmax/fmin: a NaN loss leaves them as they were
        torch.fmin(self._loss_min, v, out=self._loss_min)
        self._first_nonfinite(step, v)

    def _observe_norm(self, step: int, norm: Any) -> None:
        self._norm_seen = True
        if not isinstance(norm, torch.Tensor):
            norm = float(norm)
            if math.isfinite(norm) or self._amp is None:
                self._host_norm = max(self._host_norm, norm) if not math.isnan(norm) else self._host_norm
                if not math.isfinite(norm):
                    self._host_first = min(self._host_first, step)
            return
        v = reductions._local(norm).detach().reshape(1)
        if self._norm_max is None:
            self._norm_max = _state(-math.inf, v.device)
        v = v.to(self._norm_max.dtype)
        if self._amp is not None:  # the scaler skips such steps
            v = torch.where(torch.isfinite(v), v, float("nan"))
        torch.fmax(self._norm_max, v, out=self._norm_max)
        if self._amp is None:
            self._first_nonfinite(step, v)

    def _first_nonfinite(self, step: int, v: torch.Tensor) -> None:
        if self._first is None:
            self._first = _state(math.inf, v.device)
        # Steps increase: the smallest step whose value is not finite is the first.
        candidate = torch.full_like(self._first, float(step)).masked_fill_(torch.isfinite(v).to(self._first.device),
                                                                           math.inf)
        torch.fmin(self._first, candidate, out=self._first)

    def _global_norm(self) -> Optional[torch.Tensor]:
        grads = [reductions.dense_values(reductions._local(p.grad)) for p in self._params if p.grad is not None]
        if not grads or any(type(p.grad).__name__ == "DTensor" for p in self._params if p.grad is not None):
            return None  # a shard's norm is not the model's (pass grad_norm=)
        norm = torch.linalg.vector_norm(self._plan(grads).norms(grads, grads[0].device)[0]).reshape(1)
        return norm if self._amp is None else self._amp.unscale(norm, norm)[0]

    def parts(self, step: int) -> list[Part]:
        """The accumulators since the previous logged step (device values; then started again). NaN where
        nothing was measured: no gradient norm, no non-finite step, only NaN losses."""
        device = next((t.device for t in (self._norm_max, self._loss_max, self._first) if t is not None),
                      torch.device("cpu"))
        out: list[Part] = []
        norm = _state(self._host_norm if self._norm_seen else math.nan, device)
        if self._norm_max is not None:
            norm = torch.fmax(norm, self._norm_max.to(device))
        out.append(Part(GRAD_NORM_MAX, [""], _nan_where_inf(norm, -math.inf)))  # -inf: only NaN norms
        if self._loss_max is not None or self._host_loss is not None:
            lo, hi = self._host_loss or (math.inf, -math.inf)
            lo_t, hi_t = _state(lo, device), _state(hi, device)
            if self._loss_max is not None:
                hi_t = torch.fmax(hi_t, self._loss_max.to(device))
                lo_t = torch.fmin(lo_t, self._loss_min.to(device))
            none = hi_t == -math.inf  # only NaN losses
            out += [
                Part(LOSS_MAX, [metadata.TOTAL_LOSS], hi_t.masked_fill(none, math.nan)),
                Part(LOSS_MIN, [metadata.TOTAL_LOSS], lo_t.masked_fill(none, math.nan)),
            ]
        first = _state(self._host_first, device)
        if self._first is not None:
            first = torch.fmin(first, self._first.to(device))
        out.append(Part(NONFINITE_FIRST, [""], _nan_where_inf(first, math.inf)))  # +inf: none
        self._reset()
        return out


def _nan_where_inf(t: torch.Tensor, inf: float) -> torch.Tensor:
    return t.masked_fill(t == inf, math.nan)
