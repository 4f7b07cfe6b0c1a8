"""torch.distributed: which rank writes, and the reductions across ranks.

Every rank must call `Diagnostics.step()` on the same steps: on a logged
step the ranks take part in a few collectives (activation statistics always
under torch.distributed; norms too when parameters are FSDP2 shards).
Gradient norms under DDP need no reduction: after `backward()` every rank
holds the synchronised (averaged) gradients.
"""

from __future__ import annotations

from typing import Sequence

import torch

from tb_diag_logger import reductions


def active() -> bool:
    """Whether a default process group with more than one rank is up."""
    d = torch.distributed
    return d.is_available() and d.is_initialized() and d.get_world_size() > 1


def rank() -> int:
    d = torch.distributed
    return d.get_rank() if d.is_available() and d.is_initialized() else 0


def reduce_sharded_norms(
    norms: torch.Tensor, max_abs: torch.Tensor, weight_norms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Whole-tensor norms from per-shard ones: sqrt(sum of squares), max of max.

    Shards are never gathered: each rank sends a few floats per tensor.
    """
    if not active():
        return norms, max_abs, weight_norms
    d = torch.distributed
    sq = torch.cat([norms * norms, weight_norms * weight_norms])
    d.all_reduce(sq, op=d.ReduceOp.SUM)
    mx = max_abs.clone()
    d.all_reduce(mx, op=d.ReduceOp.MAX)
    n = norms.numel()
    return sq[:n].sqrt(), mx, sq[n:].sqrt()


def sum_counts(counts: Sequence[int]) -> list[int]:
    """Sum host integers across ranks (non-finite element counts of shards)."""
    if not active():
        return list(counts)
    t = torch.tensor(list(counts), dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return [int(v) for v in t.tolist()]


def finish_sites(sites: Sequence, device: torch.device) -> torch.Tensor:
    """[dead_fraction, saturation, mean, std] per site, reduced across ranks.

    Per-unit maxima are reduced with MAX, so a unit is dead only when it was
    never positive on any rank's batch; sums and counts with SUM.
    """
    unit_maxes = [
        s.unit_max.to(device) if s.unit_max is not None else torch.zeros(0, device=device) for s in sites
    ]
    moments = torch.stack([s.moments.to(device) for s in sites])
    saturated = torch.stack(
        [
            s.saturated.reshape(()).to(device) if s.saturated is not None else torch.zeros((), device=device)
            for s in sites
        ]
    )
    if active():
        d = torch.distributed
        flat = torch.cat(unit_maxes) if unit_maxes else torch.zeros(0, device=device)
        if flat.numel():
            d.all_reduce(flat, op=d.ReduceOp.MAX)
            unit_maxes = list(torch.split(flat, [u.numel() for u in unit_maxes]))
        sums = torch.cat([moments.reshape(-1), saturated])
        d.all_reduce(sums, op=d.ReduceOp.SUM)
        moments = sums[: moments.numel()].reshape(moments.shape)
        saturated = sums[moments.numel() :]
    rows = []
    for i, s in enumerate(sites):
        um = unit_maxes[i] if s.unit_max is not None else None
        sat = saturated[i] if s.saturated is not None else None
        rows.append(reductions.finish_activation(um, moments[i], sat))
    return torch.stack(rows).reshape(-1)
