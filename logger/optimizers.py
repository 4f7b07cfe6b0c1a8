"""The torch optimizer inside the wrappers that training frameworks put around it.

accelerate's `AcceleratedOptimizer`, Lightning's `LightningOptimizer` and
ZeRO-style optimizers hold the real optimizer as `.optimizer`. Some of them
subclass `torch.optim.Optimizer` without running its `__init__`, so they have
no step hooks: hooks go on the innermost optimizer, whose `step()` the wrapper
calls.
"""

from __future__ import annotations

from typing import Any

import torch

_MAX_DEPTH = 16  # wrappers nest a few deep; a longer chain is a cycle


def _has_step_hooks(obj: Any) -> bool:
    """A real torch optimizer: its own __init__ ran (hook dicts and param_groups exist)."""
    return (
        isinstance(obj, torch.optim.Optimizer)
        and isinstance(getattr(obj, "_optimizer_step_pre_hooks", None), dict)
        and isinstance(getattr(obj, "param_groups", None), list)
    )


def unwrap_optimizer(obj: Any, name: str = "optimizer") -> torch.optim.Optimizer:
    """The torch optimizer `obj` is or wraps through a chain of `.optimizer` attributes.

    Raises TypeError naming the argument `name` when no torch optimizer is found.
    """
    seen: set[int] = set()
    current = obj
    for _ in range(_MAX_DEPTH):
        # A real optimizer that wraps another (Lookahead-style) steps both in its own step(): stop there.
        if _has_step_hooks(current) or id(current) in seen:
            break
        seen.add(id(current))
        try:
            inner = getattr(current, "optimizer", None)
        except Exception:  # a property of a half-built wrapper may raise anything
            inner = None
        if inner is None or inner is current:
            break
        current = inner
    if _has_step_hooks(current):
        return current
    if current is not obj and isinstance(current, torch.optim.Optimizer):
        raise TypeError(
            f"{name} wraps a {type(current).__name__} that was never initialised as a torch optimizer "
            "(no step hooks, no param_groups)"
        )
    raise TypeError(
        f"{name} must be a torch.optim.Optimizer or a wrapper holding one as `.optimizer` "
        f"(accelerate, Lightning, ZeRO), got {type(obj).__name__}"
    )
