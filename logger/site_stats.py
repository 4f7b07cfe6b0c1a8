"""What a logged step knows about each activation site: a `Site`'s running statistics, the batch
records of small outputs reduced together (`Batch`), and their combination for all sites at once
(`site_totals`, read by `reductions.activation_rows`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from tb_diag_logger import reductions

_MAX_PENDING = 64  # per-call statistics a site keeps before folding them into one


@dataclass
class Site:
    """Statistics of one activation site, accumulated over a logged step's forwards.

    A call with a big output adds two or three small device tensors here
    (sum, L2 norm, and the per-unit maxima or the saturated count); small
    outputs are reduced together into batch records (`ActivationCapture`).
    Both are combined for all sites at once when the step is logged
    (`site_totals`).
    """

    name: str
    kind: str
    type_name: str
    module: str = ""  # qualified name of the module that ran it
    sums: list = field(default_factory=list)
    norms: list = field(default_factory=list)
    saturated: list = field(default_factory=list)
    count: int = 0
    unit_max: Optional[torch.Tensor] = None
    seen: bool = False

    def add(self, y: torch.Tensor) -> None:
        """Add one call's output (ignored unless a non-empty float tensor)."""
        if not isinstance(y, torch.Tensor) or not y.is_floating_point() or y.numel() == 0:
            return
        y = y.detach()
        total, norm = reductions.moments(y)
        self.count += y.numel()
        self.add_reduced(
            total,
            norm,
            reductions.unit_max(y) if self.kind == "relu" else None,
            reductions.saturated_count(y, self.kind) if self.kind in ("sigmoid", "tanh") else None,
        )

    def add_reduced(self, total, norm, unit_max, saturated) -> None:
        """Add one call's reductions (its element count is already in `count`)."""
        self.sums.append(total)
        self.norms.append(norm)
        if unit_max is not None:
            if self.unit_max is None:
                self.unit_max = unit_max
            elif self.unit_max.shape == unit_max.shape:
                self.unit_max = torch.maximum(self.unit_max, unit_max)
            # A site whose unit count changes between calls keeps its first
            # shape: per-unit identity is lost, the moments still add up.
        if saturated is not None:
            self.saturated.append(saturated)
        self.seen = True
        if len(self.sums) >= _MAX_PENDING:  # many forwards between step() calls: stay bounded
            self._fold()

    def _fold(self) -> None:
        self.sums = [torch.stack(self.sums).sum()]
        self.norms = [torch.linalg.vector_norm(torch.stack(self.norms))]
        if self.saturated:
            self.saturated = [torch.stack(self.saturated).sum()]

    def clear(self) -> None:
        """Forget this step's statistics (the site and its name stay)."""
        self.sums, self.norms, self.saturated = [], [], []
        self.count = 0
        self.unit_max = None
        self.seen = False


@dataclass
class Batch:
    """The reductions of G small outputs of one shape, reduced together: row i is `sites[i]`'s call."""

    sites: list[Site]
    sums: torch.Tensor  # [G]
    norms: torch.Tensor  # [G]
    unit_max: Optional[torch.Tensor]  # [G, units] when a member is a ReLU site
    saturated: dict[str, torch.Tensor]  # "sigmoid"/"tanh" -> [G] saturated counts


@dataclass
class SiteTotals:
    """Every statistic of S sites for one step, as device tensors (see `reductions.activation_rows`)."""

    sums: torch.Tensor  # [S]
    squares: torch.Tensor  # [S]
    counts: torch.Tensor  # [S]
    saturated: torch.Tensor  # [S]
    saturation_sites: list[int]
    unit_max: torch.Tensor  # the per-unit maxima of `relu_sites`, one block of unit_counts[k] each
    unit_counts: list[int]
    relu_sites: list[int]


def site_totals(sites: list[Site], batches: list[Batch], device: torch.device) -> SiteTotals:
    """Every statistic of `sites` and the batch records of small outputs combined: a few ops per batch
    record, whatever the number of sites."""
    S = len(sites)
    pos = {id(site): i for i, site in enumerate(sites)}
    # Calls reduced one by one (big outputs): their 0-d tensors, stacked once.
    call_site = [i for i, site in enumerate(sites) for _ in site.sums]
    sums = torch.zeros(S, device=device)
    squares = torch.zeros(S, device=device)
    saturated = torch.zeros(S, device=device)
    if call_site:
        idx = torch.tensor(call_site, device=device)
        sums.index_add_(0, idx, torch.stack([x for site in sites for x in site.sums]).to(device))
        norms = torch.stack([x for site in sites for x in site.norms]).to(device)
        squares.index_add_(0, idx, norms * norms)
    sat_call = [i for i, site in enumerate(sites) for _ in site.saturated]
    if sat_call:
        saturated.index_add_(
            0, torch.tensor(sat_call, device=device),
            torch.stack([x for site in sites for x in site.saturated]).to(device),
        )
    # Per-unit maxima: the first unit count of each ReLU site is its layout.
    units: dict[int, int] = {}
    for i, site in enumerate(sites):
        if site.unit_max is not None:
            units[i] = site.unit_max.numel()
    rows_of = []  # per batch: member positions
    for b in batches:
        at = [pos[id(site)] for site in b.sites]
        rows_of.append(at)
        idx = torch.tensor(at, device=device)
        sums.index_add_(0, idx, b.sums.to(device))
        squares.index_add_(0, idx, (b.norms * b.norms).to(device))
        for kind, counts in b.saturated.items():
            r = [k for k, site in enumerate(b.sites) if site.kind == kind]
            sat_call += [at[k] for k in r]
            saturated.index_add_(
                0, torch.tensor([at[k] for k in r], device=device),
                counts[torch.tensor(r, device=counts.device)].to(device),
            )
        if b.unit_max is not None:
            for k, site in enumerate(b.sites):
                if site.kind == "relu":
                    units.setdefault(at[k], b.unit_max.shape[1])
    relu_sites = sorted(units)
    unit_counts = [units[i] for i in relu_sites]
    offset, start = 0, {}
    for i, u in zip(relu_sites, unit_counts):
        start[i] = offset
        offset += u
    index, values = [], []
    for i in relu_sites:
        um = sites[i].unit_max
        if um is not None:
            index.append(torch.arange(start[i], start[i] + um.numel(), device=device))
            values.append(um.to(device, torch.float32))
    for b, at in zip(batches, rows_of):
        if b.unit_max is None:
            continue
        width = b.unit_max.shape[1]
        # Rows of ReLU sites whose layout is this width (a site whose unit count changed keeps its first).
        r = [k for k, site in enumerate(b.sites) if site.kind == "relu" and units.get(at[k]) == width]
        if not r:
            continue
        first = torch.tensor([start[at[k]] for k in r], device=device)
        index.append((first[:, None] + torch.arange(width, device=device)[None, :]).reshape(-1))
        values.append(b.unit_max[torch.tensor(r, device=b.unit_max.device)].to(device).reshape(-1))
    unit_max = torch.full((offset,), float("-inf"), device=device)
    if index:
        unit_max.scatter_reduce_(0, torch.cat(index), torch.cat(values), "amax", include_self=True)
    counts = torch.tensor([float(site.count) for site in sites], device=device)
    return SiteTotals(sums, squares, counts, saturated, sorted(set(sat_call)), unit_max, unit_counts, relu_sites)
