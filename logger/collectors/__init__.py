"""Collectors: one object per family of metrics, the unit `Diagnostics` is built from.

A collector owns what its family needs during training (hooks, buffers) and,
on a logged step, says what it measured::

    class Collector:
        def on_step(self, step) -> None              # at every step(), before a logged step's parts: no sync
        def arm(self, on) -> None                    # whether the next step() is likely logged: watch it
        def follow(self, params) -> None             # the model's parameters were replaced: measure these
        def set_optimizer(self, optimizer, updates)  # diag.set_optimizer: another optimizer steps the model
        def signature(self) -> Sequence[float]       # what ranks must agree on before reducing together
        def parts(self, step) -> list[Part]          # device tensors, under torch.no_grad(), no host sync
        def finish(self, step, host) -> list[Item]   # host-side derivations from every part's values
        def late(self) -> list[tuple[int, list[Part]]]  # values of an earlier step known only now
        def clear(self) -> None                      # after every step(): forget what its forwards left
        def close(self) -> None                      # remove every hook; nothing outlives it
        from_optimizer: bool                         # built from the optimizer: set_optimizer replaces it

Every method has a default that records nothing; a family overrides what it needs.

`Diagnostics` calls `parts` on every collector, concatenates their values,
moves them to the host in ONE copy and splits it by the lengths the parts
declared: `host[metric]` is each part's values (parts with ``write=False``
are there too, for another collector's `finish`). The parts with
``write=True`` and the items `finish` returns are written, on the writing
rank only; `parts` and `finish` run on every rank, since they may hold
collectives. Reducing across ranks is the collector's own business, inside
`parts`: `self.ctx.reduce` says whether the ranks agreed to reduce this step
(`signature`), `self.ctx.device` where the values go.

Adding a metric: its `MetricSpec` in `tb_diag_plugin/metadata.py`, and one
`Part` (or `Item`) returned by the collector of its family. A metric belongs
to one collector (`host` is keyed by metric). A new family: a `Collector`
subclass, built in `collectors/build.py` (the order of the list is the order
of writing). Everything a step writes passes `Output.emit`, where
`Diagnostics.observers` see `(step, items)` first (in-process findings).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from tb_diag_logger.distributed import any_sharded
from tb_diag_plugin import metadata

# (metric, layer names, layer types, values): one vector the summary sink writes.
Item = tuple[str, Sequence[str], Sequence[str], np.ndarray]


@dataclass
class Part:
    """What a collector measured on a logged step, still on the device."""

    metric: str  # a name in metadata.METRICS (or a collector's own key, with write=False)
    names: Sequence[str]  # layer names; len(names) == values.numel()
    values: torch.Tensor  # 1-D float tensor, any device
    types: Sequence[str] = ()  # layer types (activation sites), else ()
    write: bool = True  # False: only for `finish` (another collector's input), not a metric of its own


@dataclass
class StepContext:
    """What the orchestrator decided for the logged step being gathered (read by collectors in `parts`)."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    reduce: bool = True  # ranks agreed: reduce this step's values over them (True without torch.distributed)
    sharded: bool = False  # some parameter is a DTensor shard (FSDP2)
    writes: bool = True  # this process writes (the others only take part in the collectives)
    # False when step() came before backward() (no parameter has a gradient): no gradient metrics (issue 22)
    grads_valid: bool = True
    # What the current step() call was given (checked there): (name, loss) pairs, and `grad_norm=`.
    losses: list = field(default_factory=list)
    grad_norm: Any = None

    @property
    def total_loss(self) -> Any:
        """The `loss=` of the current step() call, or None."""
        return next((v for n, v in self.losses if n == metadata.TOTAL_LOSS), None)


class Collector:
    """One family of metrics (see the module docstring). The defaults record nothing."""

    ctx: StepContext = StepContext()  # replaced by the orchestrator's own when the collector is added
    # Built from the optimizer (the builder tags it, `build.from_optimizer`): `Diagnostics.set_optimizer`
    # closes it and builds one for the new optimizer; the others are told through `set_optimizer`.
    from_optimizer: bool = False

    def on_step(self, step: int) -> None:
        """At every `step()`, logged or not, before a logged step's `parts`: host work or device
        accumulators, no host synchronisation."""

    def arm(self, on: bool) -> None:
        """Whether the next `step()` is likely logged: watch its forwards and backward (or stop)."""

    def follow(self, params: Sequence[tuple[str, torch.Tensor]]) -> None:
        """The model's (selected) parameters were replaced, added or removed: measure these from now on."""

    def set_optimizer(self, optimizer: Any, updates: Any) -> None:
        """`diag.set_optimizer`: another optimizer steps the model (`updates`: the new update ratio, or None)."""

    def signature(self) -> Sequence[float]:
        """Numbers every rank must have equal before this step's values are reduced over ranks."""
        return ()

    def parts(self, step: int) -> list[Part]:
        """This logged step's values as device tensors (called under torch.no_grad(), on every rank)."""
        return []

    def finish(self, step: int, host: dict[str, np.ndarray]) -> list[Item]:
        """Items derived on the host from every part's values (`host[metric]`), on every rank."""
        return []

    def late(self) -> list[tuple[int, list[Part]]]:
        """(step, parts) measured since the last call for an earlier step (the update ratio), once; they
        ride in the next logged step's transfer, or get one of their own on other steps and at close()."""
        return []

    def clear(self) -> None:
        """Forget what the forwards since the last `step()` left (called after every `step()`)."""

    def close(self) -> None:
        """Remove every hook and buffer."""


class ParamList:
    """A collector's parameters, (name, tensor) pairs, with what is derived from the list once when it is set
    (`follow`) rather than on every logged step."""

    def __init__(self, params: Sequence[tuple[str, torch.Tensor]] = ()) -> None:
        self.pairs = list(params)
        self.names = [n for n, _ in self.pairs]
        self.tensors = [p for _, p in self.pairs]
        self.sharded = any_sharded(self.tensors)  # DTensors (FSDP2): their local shards are what is measured

    def __len__(self) -> int:
        return len(self.pairs)


class Selection:
    """Which parameter and activation-site names the user's include/exclude glob patterns keep."""

    def __init__(self, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> None:
        self.include = tuple(include)
        self.exclude = tuple(exclude)

    def __call__(self, name: str) -> bool:
        if self.include and not any(fnmatch.fnmatchcase(name, p) for p in self.include):
            return False
        return not any(fnmatch.fnmatchcase(name, p) for p in self.exclude)


def to_host(parts: Sequence[Part], device: torch.device) -> list[np.ndarray]:
    """Every part's values on the host, in ONE device-to-host copy, split by the lengths they declared."""
    values = [p.values.reshape(-1).to(device=device, dtype=torch.float32) for p in parts]
    if not values:
        return []
    flat = torch.cat(values).cpu().numpy()
    return np.split(flat, np.cumsum([v.numel() for v in values])[:-1].tolist())


def to_float(v: object) -> float:
    """`float(v)`, NaN for what is not a number."""
    try:
        return float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return float("nan")


__all__ = ["Collector", "Item", "ParamList", "Part", "Selection", "StepContext", "to_float", "to_host"]
