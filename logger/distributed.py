"""torch.distributed: which rank writes, and the reductions across ranks.

Every rank must call `Diagnostics.step()` on the same steps: on a logged
step the ranks take part in a few small collectives. First they check that
they agree on what they are about to reduce (`agree`: one all-reduce of a
signature), so that a rank that saw other activation sites or loss names
can never make a collective hang or mix up values; then:

- activation statistics: per-unit maxima with MAX (a unit is dead only if it
  was never positive on any rank's batch), sums and counts with SUM;
- losses: scalar components are averaged over ranks (the loss whose
  gradient DDP's averaged gradients are), per-sample components gathered;
- norms of FSDP2 shards: sums of squares with SUM, maxima with MAX; shards are
  never gathered.

Gradient norms under DDP need no reduction: after `backward()` every rank
holds the synchronised (averaged) gradients.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from tb_diag_logger import reductions


def initialized() -> bool:
    """Whether a default process group is up (of any size)."""
    d = torch.distributed
    return d.is_available() and d.is_initialized()


def active() -> bool:
    """Whether a default process group with more than one rank is up."""
    d = torch.distributed
    return d.is_available() and d.is_initialized() and d.get_world_size() > 1


def rank() -> int:
    """This process's rank in the default group (0 without torch.distributed)."""
    d = torch.distributed
    return d.get_rank() if d.is_available() and d.is_initialized() else 0


def world_size() -> int:
    """Number of ranks in the default group (1 without torch.distributed)."""
    d = torch.distributed
    return d.get_world_size() if d.is_available() and d.is_initialized() else 1


def agree(signature: Sequence[float], device: torch.device) -> bool:
    """Whether every rank has the same signature (a collective: all ranks get the same answer)."""
    if not active():
        return True
    d = torch.distributed
    sig = torch.tensor(list(signature), dtype=torch.float64, device=device)
    both = torch.cat([sig, -sig])
    d.all_reduce(both, op=d.ReduceOp.MAX)
    n = sig.numel()
    return bool(torch.equal(both[:n], -both[n:]))


def any_sharded(params: Iterable[torch.Tensor]) -> bool:
    """Whether any parameter is a DTensor (FSDP2 / `fully_shard`)."""
    return any(callable(getattr(p, "to_local", None)) for p in params)


def shard_weights(params: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """1.0 for each parameter whose local piece this rank contributes to a SUM over ranks, else 0.0.

    A shard counts on every rank; a replicated tensor (a plain tensor, or a
    DTensor replicated along a mesh dimension) only on the rank at
    coordinate 0, so that it is not counted once per replica.
    """
    r = rank()
    out = []
    for p in params:
        placements = getattr(p, "placements", None)
        mesh = getattr(p, "device_mesh", None)
        if placements is None or mesh is None:
            out.append(1.0 if r == 0 else 0.0)
            continue
        coord = mesh.get_coordinate() or [0] * len(placements)
        keep = all(c == 0 for c, pl in zip(coord, placements) if pl.is_replicate())
        out.append(1.0 if keep else 0.0)
    return torch.tensor(out, dtype=torch.float32, device=device)


def reduce_sharded_norms(
    norms: torch.Tensor,
    max_abs: torch.Tensor,
    weight_norms: torch.Tensor,
    norm_weights: torch.Tensor,
    weight_weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Whole-tensor norms from per-shard ones: sqrt(sum of squares), max of max.

    `norm_weights` / `weight_weights` come from `shard_weights`. Each rank
    sends a few floats per tensor.
    """
    if not active():
        return norms, max_abs, weight_norms
    d = torch.distributed
    sq = torch.cat([norms * norms * norm_weights, weight_norms * weight_norms * weight_weights])
    mx = max_abs.clone()
    if sq.numel():
        d.all_reduce(sq, op=d.ReduceOp.SUM)
    if mx.numel():
        d.all_reduce(mx, op=d.ReduceOp.MAX)
    n = norms.numel()
    norms = sq[:n].sqrt()
    # gloo's MAX drops NaN; the summed squares keep it, and a NaN element makes both NaN.
    mx = torch.where(torch.isnan(norms), norms, mx)
    return norms, mx, sq[n:].sqrt()


def sum_counts(counts: Sequence[int]) -> list[int]:
    """Sum host integers across ranks (non-finite element counts of shards)."""
    if not active() or not counts:
        return list(counts)
    t = torch.tensor(list(counts), dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return [int(v) for v in t.tolist()]


def finish_sites(t, reduce: bool) -> torch.Tensor:
    """[dead_fraction, saturation, mean, std] per site (flattened [S * 4]) from `ActivationCapture.totals`,
    reduced across ranks when `reduce`.

    Per-unit maxima are reduced with MAX, so a unit is dead only when it was
    never positive on any rank's batch; sums, sums of squares, counts and
    saturated counts with SUM. Two collectives, whatever the number of sites.
    """
    sums, squares, counts, saturated, flat = t.sums, t.squares, t.counts, t.saturated, t.unit_max
    S = counts.numel()
    if reduce and active():
        d = torch.distributed
        if flat.numel():
            d.all_reduce(flat, op=d.ReduceOp.MAX)
        packed = torch.cat([sums, squares, counts, saturated])
        d.all_reduce(packed, op=d.ReduceOp.SUM)
        sums, squares, counts, saturated = packed.split(S)
    rows = reductions.activation_rows(
        flat, t.unit_counts, t.relu_sites, sums, squares, counts, saturated, t.saturation_sites
    )
    return rows.reshape(-1)


def mean_over_ranks(values: torch.Tensor, reduce: bool) -> torch.Tensor:
    """The average over ranks of a float tensor (the tensor itself on one rank)."""
    if not (reduce and active()) or values.numel() == 0:
        return values
    out = values.detach().to(torch.float32).clone()
    torch.distributed.all_reduce(out)
    return out / world_size()


def pool_moments(n: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor,
                 reduce: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(count, mean, sum of squared deviations) of the union of every rank's values, from each rank's
    own (0-d float tensors). Two small collectives: the pooled mean first, then the deviations about it,
    so that a large common offset does not cancel the variance away in float32."""
    if not (reduce and active()):
        return n, mean, m2
    d = torch.distributed
    first = torch.stack([n, n * mean]).to(torch.float32)
    d.all_reduce(first)
    total, pooled = first[0], first[1] / first[0]
    spread = (m2 + n * (mean - pooled) ** 2).to(torch.float32).reshape(1)
    d.all_reduce(spread)
    return total, pooled, spread[0]


def gather_samples(vectors: Sequence[torch.Tensor], device: torch.device, reduce: bool) -> list[torch.Tensor]:
    """Each per-sample vector concatenated over ranks (lengths may differ between ranks)."""
    vectors = [v.detach().reshape(-1).to(device=device, dtype=torch.float32) for v in vectors]
    if not (reduce and active()) or not vectors:
        return vectors
    d = torch.distributed
    lengths = torch.tensor([float(v.numel()) for v in vectors], device=device)
    longest = lengths.clone()
    d.all_reduce(longest, op=d.ReduceOp.MAX)
    pad = [int(n) for n in longest.tolist()]
    row = torch.cat(
        [lengths] + [torch.nn.functional.pad(v, (0, m - v.numel())) for v, m in zip(vectors, pad)]
    )
    rows = [torch.empty_like(row) for _ in range(world_size())]
    d.all_gather(rows, row)
    k = len(vectors)
    out: list[list[torch.Tensor]] = [[] for _ in vectors]
    for other in rows:
        counts = [int(n) for n in other[:k].tolist()]
        offset = k
        for j, m in enumerate(pad):
            out[j].append(other[offset : offset + counts[j]])
            offset += m
    return [torch.cat(parts) for parts in out]

