"""Hooks on the user's modules that leave no trace in a pickle, a save or a copy of the model.

`torch.save(model)`, `pickle.dumps(model)` and `copy.deepcopy(model)` (early stopping's `best`,
`AveragedModel`, EMA helpers) copy a module's `__dict__`, hook dictionaries included. A hook of
ours would drag the logger (its writer, its locks, its code objects) into the copy, or fail to
pickle. So every hook or attribute we put on a module is tagged, and the module gets an
instance-level `__reduce_ex__` that builds the usual reduction without them: the copy or the
saved file holds only torch's own objects (it loads where tb-diag is not installed), and a
copy's forward passes never reach our statistics.
"""

from __future__ import annotations

import types
import weakref
from collections import OrderedDict
from typing import Any, Callable

from torch import nn

_TAG = "__tb_diag_hook__"  # set on functions we store as module attributes
_REDUCE = "__reduce_ex__"
# Dictionaries keyed by a hook's id that hold flags about hooks kept in the *_hooks dictionaries.
_HOOK_FLAGS = ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")


class _Hook:
    """A hook of ours: calls `fn`, and is recognised (and left out) when its module is copied."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


class Handle:
    """Removes one hook of ours, and the module's guard with its last one (nothing of ours is left)."""

    def __init__(self, module: nn.Module, handle: Any) -> None:
        self._module = weakref.ref(module)
        self._handle = handle

    def remove(self) -> None:
        self._handle.remove()
        module = self._module()
        if module is not None:
            _unguard(module)


def forward_hook(module: nn.Module, fn: Callable[..., Any], **kwargs: Any) -> Handle:
    """`module.register_forward_hook(fn, **kwargs)`, left out of pickles and copies of `module`."""
    _guard(module)
    return Handle(module, module.register_forward_hook(_Hook(fn), **kwargs))


def forward_pre_hook(module: nn.Module, fn: Callable[..., Any], **kwargs: Any) -> Handle:
    """`module.register_forward_pre_hook(fn, **kwargs)`, left out of pickles and copies of `module`."""
    _guard(module)
    return Handle(module, module.register_forward_pre_hook(_Hook(fn), **kwargs))


def set_attribute(module: nn.Module, name: str, fn: types.FunctionType) -> None:
    """Put the function `fn` on `module` as an instance attribute (a wrapped `training_step`), left
    out of pickles and copies; remove it with `del_attribute`."""
    setattr(fn, _TAG, True)
    _guard(module)
    object.__setattr__(module, name, fn)


def del_attribute(module: nn.Module, name: str) -> None:
    """Remove an attribute put there by `set_attribute` (the class's own attribute shows again)."""
    if _ours(vars(module).get(name)):
        del vars(module)[name]
    _unguard(module)


def _ours(value: Any) -> bool:
    return isinstance(value, _Hook) or (isinstance(value, types.FunctionType) and getattr(value, _TAG, False) is True)


def _guard(module: nn.Module) -> None:
    # An instance attribute shadows object.__reduce_ex__ for pickle and copy alike: both look it up on
    # the object.
    if _REDUCE not in vars(module):
        object.__setattr__(module, _REDUCE, types.MethodType(_reduce_ex, module))


def _unguard(module: nn.Module) -> None:
    """Drop the guard once nothing of ours is left on the module."""
    state = vars(module)
    if _REDUCE in state and not any(_ours(v) for v in state.values()) and not _has_hooks(state):
        del state[_REDUCE]


def _has_hooks(state: dict) -> bool:
    return any(
        key.endswith("hooks") and isinstance(value, dict) and any(_ours(h) for h in value.values())
        for key, value in state.items()
    )


def _reduce_ex(module: nn.Module, protocol: int) -> Any:
    """The reduction `type(module)` would give, with our hooks and attributes left out of its state."""
    rv = type(module).__reduce_ex__(module, protocol)
    if isinstance(rv, tuple) and len(rv) >= 3 and isinstance(rv[2], dict):
        rv = (*rv[:2], without_ours(rv[2]), *rv[3:])
    return rv


def without_ours(state: dict) -> dict:
    """A copy of a module's `__dict__` (its pickled state) without anything tb-diag put there."""
    out = {k: v for k, v in state.items() if k != _REDUCE and not _ours(v)}
    dropped: set[int] = set()
    for key, value in state.items():
        if key.endswith("hooks") and isinstance(value, dict) and any(_ours(h) for h in value.values()):
            dropped.update(k for k, h in value.items() if _ours(h))
            out[key] = OrderedDict((k, h) for k, h in value.items() if not _ours(h))
    for key in _HOOK_FLAGS:
        flags = out.get(key)
        if dropped and isinstance(flags, dict):
            out[key] = OrderedDict((k, v) for k, v in flags.items() if k not in dropped)
    return out
