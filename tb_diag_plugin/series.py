"""`Series`: one metric of one run as a steps x layers matrix, what the rules read.

numpy only, so the rules run (and are tested) without TensorBoard; the reader
(`reading`) builds these from TensorBoard's data provider. Outside `findings`
so that reading a run does not load the rules.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Series:
    """One metric of one run: values[i, j] is layer j at steps[i].

    `present` is False where a layer had no value at a step (it was not in
    that step's layer set); such cells hold NaN, which is distinct from a
    recorded NaN only through `present`.
    """

    metric: str
    layers: list[str]
    layer_types: list[str]
    steps: np.ndarray  # int64 [S]
    values: np.ndarray  # float32 [S, L]
    present: np.ndarray  # bool [S, L]

    def layer(self, name: str) -> np.ndarray:
        """Values of one layer over steps (NaN where absent)."""
        return self.values[:, self.layers.index(name)]
