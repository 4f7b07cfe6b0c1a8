"""Helpers for the logger tests: read what a run wrote, through the real reading path."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tb_diag_plugin.reading import LocalReader, Series


def train_small(writer, steps: range, seed: int = 0, dead: bool = False) -> None:
    """A few steps of a tiny MLP (ReLU and sigmoid sites) logged at every step through `writer`, flushed.

    `dead`: every ReLU unit off from the start, a run with findings."""
    from tb_diag_logger import Diagnostics

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Sigmoid(), nn.Linear(8, 1))
    if dead:
        with torch.no_grad():
            model[0].bias.fill_(-100.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    diag = Diagnostics(model, writer, every=1, optimizer=opt)
    x = torch.randn(16, 4)
    for step in steps:
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        diag.step(step, loss=loss)
        opt.step()
    diag.close()
    writer.flush()


class _TinyBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        return F.relu(self.fc(x))


class WideModel(nn.Module):
    """Issue 7's worst case (benchmarks/wide_model.py): `n` blocks of Linear(2, 2) + a functional relu,
    so 2n parameter tensors and n activation sites; input [batch, 2]."""

    def __init__(self, n: int = 1000) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_TinyBlock() for _ in range(n))

    def forward(self, x):
        return torch.stack([b(x) for b in self.blocks]).sum()


def read(logdir, run: str = ".") -> dict[str, Series]:
    """Every metric a run recorded, read back from its event files with `LocalReader`."""
    reader = LocalReader(str(logdir))
    assert run in reader.runs(), f"no run {run!r} in {reader.runs()}"
    return reader.series(run)


def at(series: dict[str, Series], metric: str, layer: str, step: int) -> float:
    """The recorded value of `metric` for `layer` at `step` (fails if it was not recorded)."""
    s = series[metric]
    assert layer in s.layers, f"{metric}: no layer {layer!r} in {s.layers}"
    rows = np.nonzero(s.steps == step)[0]
    assert rows.size == 1, f"{metric}: step {step} not in {s.steps.tolist()}"
    j = s.layers.index(layer)
    assert s.present[rows[0], j], f"{metric}/{layer} not recorded at step {step}"
    return float(s.values[rows[0], j])


def recorded(series: dict[str, Series], metric: str, layer: str, step: int) -> bool:
    """Whether `metric` has a value for `layer` at `step`."""
    s = series.get(metric)
    if s is None or layer not in s.layers:
        return False
    rows = np.nonzero(s.steps == step)[0]
    return bool(rows.size) and bool(s.present[rows[0], s.layers.index(layer)])


def close(a: float, b: float, rel: float = 1e-5, abs_: float = 1e-7) -> bool:
    """Float32-tolerant equality that treats NaN == NaN and inf == inf."""
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if math.isinf(a) or math.isinf(b):
        return a == b
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


def unit_dead_fraction(y: np.ndarray, unit_axis: Optional[int] = None) -> float:
    """Share of units never positive in `y`, by hand: a loop over units."""
    if unit_axis is None:
        unit_axis = 1 if y.ndim in (2, 4, 5) else y.ndim - 1
    units = np.moveaxis(y, unit_axis, 0).reshape(y.shape[unit_axis], -1)
    dead = sum(1 for u in units if not any(v > 0 for v in u))
    return dead / units.shape[0]
