"""`learning_rate`: each parameter group's learning rate as the optimizer holds it on the logged step."""

from __future__ import annotations

import numpy as np

from tb_diag_logger.collectors import Collector, Item, to_float


class LearningRate(Collector):
    """One layer per parameter group ("" when there is one), read on the host."""

    def __init__(self, optimizer) -> None:
        self.optimizer = optimizer

    def finish(self, step: int, host: dict[str, np.ndarray]) -> list[Item]:
        groups = self.optimizer.param_groups
        names = [""] if len(groups) == 1 else [f"group{i}" for i in range(len(groups))]
        return [("learning_rate", names, (), np.array([to_float(g.get("lr", float("nan"))) for g in groups]))]
