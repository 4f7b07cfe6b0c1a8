"""What `Diagnostics` and the framework callbacks accept: argument checks that raise a TypeError or
ValueError naming the problem, and the one warning a failing diagnostic gives."""

from __future__ import annotations

import numbers
import os
import warnings
from typing import Any, Sequence, Union

from torch import nn

from tb_diag_logger import distributed, reductions
from tb_diag_logger.collectors import amp


class DiagnosticsWarning(UserWarning):
    """A diagnostic failed; training goes on (reported once per place)."""


def warn_once(warned: set[str], where: str, exc: BaseException, stacklevel: int = 2) -> None:
    """One `DiagnosticsWarning` per place and exception type (`warned` remembers them): training goes on.

    `stacklevel` as `warnings.warn` would count it from the caller."""
    key = f"{where}:{type(exc).__name__}"
    if key in warned:
        return
    warned.add(key)
    warnings.warn(
        f"tb-diag: {where} failed ({type(exc).__name__}: {exc}); training continues, "
        "this diagnostic may be missing. Reported once.",
        DiagnosticsWarning,
        stacklevel=stacklevel + 1,
    )


def _patterns(value: Union[str, Sequence[str], None], name: str) -> tuple[str, ...]:
    """Glob patterns as a tuple (one string is one pattern); TypeError naming `name` otherwise."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, (list, tuple, set, frozenset)) or not all(isinstance(p, str) for p in value):
        raise TypeError(f"{name} must be a glob pattern or a list of them, got {value!r}")
    return tuple(value)


def check_every(every: Any) -> int:
    """`every` as a positive int; TypeError/ValueError naming it otherwise (Diagnostics and the callbacks)."""
    if isinstance(every, bool) or not isinstance(every, numbers.Integral):
        raise TypeError(f"every must be a positive int, got {every!r}")
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    return int(every)


def check_output(writer: Any, logdir: Any, write_rank: Any) -> None:
    """Where the events go: a SummaryWriter or a directory (not both), and a rank that exists."""
    if isinstance(writer, (str, os.PathLike)):
        raise TypeError(
            f"writer must be a torch.utils.tensorboard.SummaryWriter, got the path {os.fspath(writer)!r}: "
            "pass a directory as logdir= instead"
        )
    if writer is not None and not callable(getattr(writer, "_get_file_writer", None)):
        raise TypeError(f"writer must be a torch.utils.tensorboard.SummaryWriter, got {type(writer).__name__}")
    if writer is not None and logdir is not None:
        raise ValueError("pass either writer or logdir, not both")
    if logdir is not None and not isinstance(logdir, (str, os.PathLike)):
        raise TypeError(f"logdir must be a path, got {type(logdir).__name__}")
    if isinstance(write_rank, bool) or not isinstance(write_rank, numbers.Integral) or write_rank < 0:
        raise ValueError(f"write_rank must be a rank (an int >= 0), got {write_rank!r}")
    if writer is None and logdir is None and not (distributed.initialized() and distributed.rank() != write_rank):
        raise ValueError("pass a SummaryWriter as writer, or a directory as logdir")
    if distributed.initialized() and write_rank >= distributed.world_size():
        raise ValueError(f"write_rank must be a rank below the world size {distributed.world_size()}, got {write_rank}")


def check_scaler(scaler: Any) -> None:
    """`scaler` is None or a `torch.amp.GradScaler`."""
    if scaler is not None and not amp.is_scaler(scaler):
        raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")


def check_optional_bool(value: Any, name: str) -> Any:
    """`value` is a bool or None (None: the default chosen from the model)."""
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool or None, got {value!r}")
    return value


def check_impl(impl: Any) -> Any:
    """`impl` names a reduction (`reductions.Plan`) or is None: a ValueError naming the choices now, not a
    warning on a logged step."""
    reductions.choose([], impl)
    return impl


def unwrap_model(model: nn.Module) -> tuple[nn.Module, bool]:
    """The module whose names users know, inside DDP/DataParallel and torch.compile: (module, compiled)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    compiled = False
    for _ in range(8):
        if getattr(model, "_compiled_call_impl", None) is not None:  # nn.Module.compile(), in place
            compiled = True
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile(model)
            model, compiled = model._orig_mod, True
        elif type(model).__name__ in ("DistributedDataParallel", "DataParallel") and isinstance(
            getattr(model, "module", None), nn.Module
        ):
            model = model.module
        else:
            break
    return model, compiled
