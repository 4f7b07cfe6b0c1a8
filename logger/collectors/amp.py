"""Mixed precision: what a `torch.amp.GradScaler` says about the gradients.

Before `scaler.unscale_(optimizer)` (which `scaler.step` calls if the user
did not) the gradients are multiplied by the loss scale (65,536 at first):
their norms are divided by it here, so a scaled gradient never looks like
an exploding one. After `unscale_` the scaler knows whether it found
inf/NaN, and therefore whether `scaler.step` will skip the optimizer step.
Only public attributes and the scaler's per-optimizer stage are read; the
scaler is never modified.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from tb_diag_logger.collectors import Collector, Item, Part

AMP_SCALE, AMP_SKIPPED = "amp_scale", "amp_skipped"


def is_scaler(scaler: Any) -> bool:
    """Whether `scaler` looks like a `torch.amp.GradScaler` (or the cuda one)."""
    return callable(getattr(scaler, "get_scale", None)) and callable(getattr(scaler, "unscale_", None))


def enabled(scaler: Any) -> bool:
    """Whether the scaler scales at all (``GradScaler(enabled=False)`` does not)."""
    is_enabled = getattr(scaler, "is_enabled", None)
    return bool(is_enabled()) if callable(is_enabled) else True


def scale_tensor(scaler: Any, device: torch.device) -> torch.Tensor:
    """The current loss scale as a 1-element float32 tensor on `device`, without a host sync."""
    if not enabled(scaler):
        return torch.ones(1, device=device)
    get_async = getattr(scaler, "_get_scale_async", None)
    scale = get_async() if callable(get_async) else None
    if isinstance(scale, torch.Tensor):
        return scale.detach().reshape(1).to(device=device, dtype=torch.float32)
    return torch.tensor([float(scaler.get_scale())], dtype=torch.float32, device=device)


def _states(scaler: Any, optimizer: Optional[torch.optim.Optimizer]) -> list[dict]:
    # `.get`/`.values()`: indexing the scaler's defaultdict would add an entry.
    states = getattr(scaler, "_per_optimizer_states", None)
    if not isinstance(states, dict):
        return []
    if optimizer is not None:
        state = states.get(id(optimizer))
        return [state] if isinstance(state, dict) else []
    return [s for s in states.values() if isinstance(s, dict)]


def _stage(state: dict) -> str:
    stage = state.get("stage")
    return getattr(stage, "name", str(stage))


def already_unscaled(scaler: Any, optimizer: Optional[torch.optim.Optimizer]) -> bool:
    """Whether the gradients are unscaled already (`unscale_` or `scaler.step` ran since `update()`)."""
    if not enabled(scaler):
        return True
    return any(_stage(s) in ("UNSCALED", "STEPPED") for s in _states(scaler, optimizer))


def found_inf(scaler: Any, optimizer: Optional[torch.optim.Optimizer], device: torch.device) -> Optional[torch.Tensor]:
    """1-element tensor > 0 when `unscale_` found inf/NaN (the step will be skipped); None if not known yet."""
    if not enabled(scaler):
        return torch.zeros(1, device=device)
    found = [
        t.detach().reshape(1).to(device=device, dtype=torch.float32)
        for s in _states(scaler, optimizer)
        if _stage(s) in ("UNSCALED", "STEPPED")
        for t in (s.get("found_inf_per_device") or {}).values()
        if isinstance(t, torch.Tensor)
    ]
    if not found:
        return None
    return torch.cat(found).sum().reshape(1)


class AmpState(Collector):
    """`amp_scale` and `amp_skipped` of a GradScaler; also unscales the gradient collector's norms."""

    def __init__(self, scaler: Any, optimizer: Optional[torch.optim.Optimizer]) -> None:
        self.scaler = scaler
        self.optimizer = optimizer
        self._skip_known = False

    def set_optimizer(self, optimizer: Any, updates: Any) -> None:
        # The scaler's stage is kept per optimizer: the old one's would say "still scaled" forever.
        self.optimizer = optimizer

    def unscale(self, norms: torch.Tensor, max_abs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradient statistics divided by the loss scale while the gradients are still scaled."""
        if already_unscaled(self.scaler, self.optimizer):
            return norms, max_abs
        scale = scale_tensor(self.scaler, norms.device)
        return norms / scale, max_abs / scale

    def parts(self, step: int) -> list[Part]:
        device = self.ctx.device
        parts = [Part(AMP_SCALE, [""], scale_tensor(self.scaler, device))]
        found = found_inf(self.scaler, self.optimizer, device)
        self._skip_known = found is not None
        if found is not None:  # `unscale_` ran: the scaler skips the step when it found inf/NaN
            parts.append(Part(AMP_SKIPPED, [""], ((found > 0) | ~torch.isfinite(found)).to(torch.float32)))
        return parts

    def finish(self, step: int, host: dict[str, np.ndarray]) -> list[Item]:
        if self._skip_known:
            return []
        # Not unscaled yet: the scaler will skip exactly when a gradient is not finite.
        norms = host.get("grad_norm", np.zeros(0))
        return [(AMP_SKIPPED, [""], (), np.array([float(not np.isfinite(norms).all())], np.float32))]
