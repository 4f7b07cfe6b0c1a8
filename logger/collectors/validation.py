"""Validation results: what `Diagnostics.evaluate()` is given, checked and turned into vectors.

`loss=` is recorded as `val_loss` (layer ``total``); each entry of
`metrics=` as `val_metric`, one layer per metric name (sorted, so that the
same set of names always lands in the same tag). Values are read on the
host once per evaluation: an evaluation is rare and its loss is usually
already a Python float.
"""

from __future__ import annotations

import numbers
from typing import Any, Mapping, Optional

import numpy as np
import torch

from tb_diag_logger.collectors import Collector, Part
from tb_diag_logger.collectors.losses import check_scalar
from tb_diag_plugin import metadata

VAL_LOSS, VAL_METRIC = metadata.VALIDATION_METRICS


def check_step(step: Any) -> int:
    """`step` as a non-negative int (an int tensor of one element is accepted); TypeError/ValueError otherwise."""
    if isinstance(step, torch.Tensor) and step.numel() == 1 and not step.is_floating_point():
        step = int(step.item())
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise TypeError(f"step must be an int, got {type(step).__name__}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return int(step)


def check_evaluation(loss: Any, metrics: Optional[Mapping[str, Any]]) -> list[tuple[str, str, Any]]:
    """(metric, layer, value) triples to record; raises TypeError/ValueError naming the bad argument."""
    items: list[tuple[str, str, Any]] = []
    if loss is not None:
        items.append((VAL_LOSS, metadata.TOTAL_LOSS, check_scalar("loss", loss)))
    if metrics is not None:
        if not isinstance(metrics, Mapping):
            raise TypeError(f"metrics must be a dict of name -> number, got {type(metrics).__name__}")
        for name in sorted(metrics, key=lambda n: (not isinstance(n, str), str(n))):
            if not isinstance(name, str) or not name:
                raise TypeError(f"metrics keys must be non-empty strings, got {name!r}")
            items.append((VAL_METRIC, name, check_scalar(f"metrics[{name!r}]", metrics[name])))
    if not items:
        raise ValueError("evaluate() needs loss= or metrics=")
    return items


def evaluation_vectors(items: list[tuple[str, str, Any]]) -> list[tuple[str, list[str], tuple, np.ndarray]]:
    """`SummarySink.write_vectors` items for checked triples (tensors are read on the host here)."""
    values = [float(v.detach().reshape(()).to("cpu", torch.float64)) if isinstance(v, torch.Tensor) else float(v)
              for _, _, v in items]
    out = []
    for metric in (VAL_LOSS, VAL_METRIC):
        idx = [i for i, (m, _, _) in enumerate(items) if m == metric]
        if idx:
            out.append((metric, [items[i][1] for i in idx], (), np.array([values[i] for i in idx], np.float32)))
    return out



class Validation(Collector):
    """`val_loss` and `val_metric` from `Diagnostics.evaluate()`: written at the evaluation's own step."""

    def __init__(self) -> None:
        self._pending: list[tuple[int, list[Part]]] = []
        self.last_step: Optional[int] = None  # evaluate() has its own order, apart from step()'s

    def record(self, step: int, loss: Any, metrics: Optional[Mapping[str, Any]]) -> None:
        """Check one evaluation (TypeError/ValueError naming what is wrong) and keep it for `late`."""
        step = check_step(step)
        if self.last_step is not None and step < self.last_step:
            raise ValueError(f"step must not decrease between evaluate() calls: got {step} after {self.last_step}")
        items = check_evaluation(loss, metrics)
        self.last_step = step
        self._pending.append((step, [Part(metric, names, torch.from_numpy(values))
                                     for metric, names, _, values in evaluation_vectors(items)]))

    def late(self) -> list[tuple[int, list[Part]]]:
        pending, self._pending = self._pending, []
        return pending
