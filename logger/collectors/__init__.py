"""Collectors: one family of metrics each, gathered on logged steps into one device-to-host copy.

A collector returns, on a logged step, device tensors paired with what they
are (`Part`); the orchestrator concatenates every part, copies them to the
host once, splits them by the declared lengths, hands each collector its own
values (`finish`) for host-side derivations, and writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

# (metric, layer names, layer types, values): one vector the summary sink writes.
Item = tuple[str, Sequence[str], Sequence[str], np.ndarray]


@dataclass
class Part:
    """One metric's values on a logged step, still on the device."""

    metric: str  # a name in metadata.METRICS
    names: Sequence[str]  # layer names; len(names) == values.numel()
    values: torch.Tensor  # 1-D float tensor, any device (no .item(), no host sync)
    types: Sequence[str] = ()  # layer types (activation sites), else ()


class Collector:
    """Base class: every method a no-op, so a collector overrides only what it needs."""

    def parts(self, step: int) -> list[Part]:
        """On a logged step, under torch.no_grad(): device values to bring to the host."""
        return []

    def finish(self, step: int, host: dict[str, np.ndarray]) -> list[Item]:
        """Host-side derivations from this collector's parts (`host`: metric -> values); default none."""
        return []

    def close(self) -> None:
        """Remove every hook; nothing outlives it."""
