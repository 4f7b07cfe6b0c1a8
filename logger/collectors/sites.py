"""Activation sites: `dead_fraction`, `saturation`, `act_mean` and `act_std` of each site a logged
step's training forwards ran, from the eager capture (`activations.py`) or the compiled one
(`compiled.py`). Reduced over ranks with two collectives (`distributed.finish_sites`): a unit is dead
only when no rank's batch made it positive."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from tb_diag_logger import distributed
from tb_diag_logger.collectors import Collector, Part
from tb_diag_logger.collectors.params import name_hash

DEAD_FRACTION, SATURATION, ACT_MEAN, ACT_STD = "dead_fraction", "saturation", "act_mean", "act_std"


class ActivationSites(Collector):
    """Turns the capture's per-site statistics into parts; the capture owns the hooks."""

    def __init__(self, capture: Any) -> None:
        self.capture = capture  # activations.ActivationCapture or compiled.CompiledCapture
        self.seen: list = []  # the sites of the step being gathered, in stable order
        self._totals = None
        self._taken = False

    def _take(self) -> None:
        if not self._taken:
            self._taken = True
            self.seen = self.capture.take()
            self._totals = self.capture.totals(self.seen, self.ctx.device) if self.seen else None

    def signature(self) -> Sequence[float]:
        self._take()
        units = sum(self._totals.unit_counts) if self._totals is not None else 0
        return [len(self.seen), name_hash([f"{s.name}\t{s.kind}" for s in self.seen]), float(units)]

    def parts(self, step: int) -> list[Part]:
        self._take()
        self._taken = False
        sites, totals, self._totals = self.seen, self._totals, None
        if not sites:
            return []
        rows = distributed.finish_sites(totals, self.ctx.reduce).reshape(len(sites), 4)
        names = [s.name for s in sites]
        types = [s.type_name for s in sites]
        parts = []
        for metric, col, kinds in ((DEAD_FRACTION, 0, ("relu",)), (SATURATION, 1, ("sigmoid", "tanh"))):
            idx = [i for i, s in enumerate(sites) if s.kind in kinds]
            if idx:
                at = torch.tensor(idx, device=rows.device)
                parts.append(Part(metric, [names[i] for i in idx], rows[at, col], [types[i] for i in idx]))
        return parts + [Part(ACT_MEAN, names, rows[:, 2], types), Part(ACT_STD, names, rows[:, 3], types)]

    def arm(self, on: bool) -> None:
        self.capture.armed = on  # the capture's hooks record only a likely logged step's forwards

    def clear(self) -> None:
        self._taken = False
        self._totals = None
        self.capture.clear()

    def close(self) -> None:
        self.capture.close()
