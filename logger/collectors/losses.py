"""The `loss` metric: checking what `step()` is given, and reducing it on the device.

`loss=` is recorded as layer ``total``; each entry of `losses=` under its own
name. A scalar (a 1-element tensor or a number) is recorded as is; a 1-D
per-sample tensor (``reduction="none"``) is recorded as its mean, and its
spread (min, 5/25/50/75/95 % quantiles, max) as the `loss_min` ...
`loss_max` metrics. Under torch.distributed scalars are averaged over
ranks and per-sample vectors are gathered from every rank.
"""

from __future__ import annotations

import numbers
import zlib
from typing import Any, Mapping, Optional, Union

import torch

from tb_diag_logger import distributed, reductions
from tb_diag_logger.collectors import Collector, Part
from tb_diag_plugin import metadata

LossLike = Union[torch.Tensor, float, int]

LOSS = "loss"
SPREAD_METRICS = metadata.LOSS_SPREAD_METRICS  # min, the reductions.QUANTILES, max


def is_per_sample(value: Any) -> bool:
    """A 1-D tensor with other than one element: a per-sample loss."""
    return isinstance(value, torch.Tensor) and value.ndim == 1 and value.numel() != 1


def check_scalar(name: str, value: Any) -> Union[torch.Tensor, float]:
    """`value` as a tensor or float; TypeError/ValueError naming `name` otherwise."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar (one element), got a tensor of shape {tuple(value.shape)}")
        if not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} must be a float tensor, got dtype {value.dtype}")
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a tensor or a number, got {type(value).__name__}")
    return float(value)


def check_losses(loss: Optional[LossLike], losses: Optional[Mapping[str, LossLike]]) -> list[tuple[str, Any]]:
    """(name, value) pairs to record; raises TypeError/ValueError naming the bad argument."""
    items: list[tuple[str, Any]] = []
    if loss is not None:
        items.append((metadata.TOTAL_LOSS, check_scalar("loss", loss)))
    if losses is None:
        return items
    if not isinstance(losses, Mapping):
        raise TypeError(f"losses must be a dict of name -> loss, got {type(losses).__name__}")
    for name, value in losses.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"losses keys must be non-empty strings, got {name!r}")
        if name == metadata.TOTAL_LOSS and loss is not None:
            raise ValueError(f"losses may not use the name {name!r} together with loss=")
        if is_per_sample(value):
            if not value.is_floating_point():
                raise TypeError(f"losses[{name!r}] must be a float tensor, got dtype {value.dtype}")
            items.append((name, value))
        else:
            items.append((name, check_scalar(f"losses[{name!r}]", value)))
    return items


def loss_tensors(
    items: list[tuple[str, Any]], device: torch.device, reduce: bool
) -> tuple[list[str], torch.Tensor, list[str], torch.Tensor]:
    """(names, values [L], per-sample names, spreads [S, 7]) on `device`, reduced over ranks."""
    names = [n for n, _ in items]
    scalar_idx = [i for i, (_, v) in enumerate(items) if not is_per_sample(v)]
    sample_idx = [i for i, (_, v) in enumerate(items) if is_per_sample(v)]
    values = torch.empty(len(items), dtype=torch.float32, device=device)
    if scalar_idx:
        scalars = torch.cat(
            [
                v.detach().reshape(1).to(device=device, dtype=torch.float32)
                if isinstance(v, torch.Tensor)
                else torch.tensor([v], dtype=torch.float32, device=device)
                for i, (_, v) in enumerate(items)
                if i in scalar_idx
            ]
        )
        values[scalar_idx] = distributed.mean_over_ranks(scalars, reduce)
    spreads = torch.zeros((0, len(SPREAD_METRICS)), device=device)
    if sample_idx:
        vectors = distributed.gather_samples([items[i][1] for i in sample_idx], device, reduce)
        means = [v.mean().reshape(1) if v.numel() else torch.full((1,), float("nan"), device=device) for v in vectors]
        values[sample_idx] = torch.cat(means)
        spreads = torch.stack([reductions.spread(v) for v in vectors])
    return names, values, [names[i] for i in sample_idx], spreads


class Losses(Collector):
    """The `loss=`/`losses=` of the current `step()` call (checked there, in `ctx.losses`), reduced on the
    logged step."""

    def signature(self) -> list[float]:
        items = self.ctx.losses
        names = [n for n, _ in items]
        per_sample = [n for n, v in items if is_per_sample(v)]
        return [len(names), _hash(names), _hash(per_sample)]

    def parts(self, step: int) -> list[Part]:
        names, values, spread_names, spreads = loss_tensors(self.ctx.losses, self.ctx.device, self.ctx.reduce)
        return [Part(LOSS, names, values)] + [
            Part(metric, spread_names, spreads[:, j]) for j, metric in enumerate(SPREAD_METRICS)
        ]


def _hash(names: list[str]) -> float:
    return float(zlib.crc32("\n".join(names).encode("utf-8")))
