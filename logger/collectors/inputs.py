"""The model input's scale: `input_mean` and `input_std` of the first floating-point tensor the
root module is called with, on logged training forwards only (issue 22: inputs not normalised).

Raw features of scale ~100 into a network initialised for unit inputs make the first layer's
activations and weight gradients ~100x too large; only the input itself says that this is the
cause. Integer inputs (token ids) are skipped. One forward hook on the root (after the forward, as
the logits' hook: no pre-hook, which a model compiled in place would trace) that returns at once
unless the activation capture is armed for a logged step; no host sync.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from tb_diag_logger import distributed, hooks
from tb_diag_logger.collectors import Collector, Part
from tb_diag_logger.collectors.logits import _compiling
from tb_diag_plugin import metadata

MEAN, STD = metadata.INPUT_METRICS


def first_float_input(args: tuple, kwargs: Mapping[str, Any]) -> Optional[torch.Tensor]:
    """The first floating-point tensor among a forward's positional, then keyword, arguments, or None."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor) and a.is_floating_point() and a.numel() > 1:
            return a
    return None


class InputScale(Collector):
    """Owns the root's forward hook and the logged step's running input moments."""

    def __init__(self, model: nn.Module, armed: Callable[[], bool], on_error: Callable[[str, BaseException], None],
                 hook_on: Optional[nn.Module] = None):
        """`hook_on` (default: `model`) is where the hook goes, e.g. a compiled wrapper."""
        self._armed = armed
        self._on_error = on_error
        self._sums: Optional[torch.Tensor] = None  # [sum, sum of squares, count] over this step's forwards
        self._handle = hooks.forward_hook(model if hook_on is None else hook_on, self._post, with_kwargs=True)

    def _post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if _compiling() or not self._armed() or not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
            return None  # not a logged step's training forward
        try:
            x = first_float_input(args, kwargs)
            if x is not None:
                self._add(x)
        except Exception as e:  # never into the training loop
            self._on_error("input statistics", e)
        return None

    def feed(self, inputs: Sequence[torch.Tensor]) -> None:
        """This logged step's training inputs as an integration sees them (Lightning's batches, when its
        `training_step` calls a submodule and the root's forward never runs): counted only when the forward
        hook recorded none, so nothing is counted twice."""
        if self._sums is None:
            for x in inputs:
                self._add(x)

    def _add(self, x: torch.Tensor) -> None:
        with torch.no_grad():
            x32 = x.detach().to(torch.float32)
            # Moments about the first element: a large common offset does not cancel the variance away.
            shift = x32.reshape(-1)[0]
            d = x32 - shift
            s = torch.stack([d.sum(), (d * d).sum(), torch.tensor(float(x.numel()), device=x.device),
                             shift])
            if self._sums is None:
                self._sums = s
            else:  # several forwards before step(): pool them about the first one's shift
                s0 = self._sums[3]
                off = shift - s0
                n = s[2]
                self._sums = self._sums + torch.stack([
                    s[0] + n * off, s[1] + 2 * off * s[0] + n * off * off, n, torch.zeros_like(off)])

    def signature(self) -> Sequence[float]:
        """Whether this rank saw a training input: ranks pool their inputs only when all of them did."""
        return (float(self._sums is not None),)

    def parts(self, step: int) -> list[Part]:
        """`MEAN` and `STD` of this step's training inputs (every rank's batches when the ranks agreed to
        reduce, as the activation statistics are), else nothing."""
        s, self._sums = self._sums, None
        if s is None:
            return []
        s = s.to(self.ctx.device)
        n, mean_d = s[2], s[0] / s[2]
        m2 = torch.clamp(s[1] - n * mean_d * mean_d, min=0.0)
        n, mean, m2 = distributed.pool_moments(n, mean_d + s[3], m2, self.ctx.reduce)
        std = torch.sqrt(torch.clamp(m2 / n, min=0.0))
        return [Part(MEAN, [""], mean.reshape(1)), Part(STD, [""], std.reshape(1))]

    def clear(self) -> None:
        """Forget what this step's forwards left (a step that was not logged)."""
        self._sums = None

    def close(self) -> None:
        """Remove the hook."""
        self._handle.remove()
        self._sums = None
