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

import torch


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
