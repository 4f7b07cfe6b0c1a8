"""Findings rules on runs that run away: `loss_diverged`, `weight_norm_growth` and
`weight_decay_equilibrium` (weights pinned or shrunk by weight decay)."""

from __future__ import annotations

from typing import Optional

import numpy as np

from tb_diag_plugin import metadata
from tb_diag_plugin.findings import advice
from tb_diag_plugin.findings.context import (
    CUTOFF,
    Context,
    Rule,
    blocks,
    fmt,
    is_bias,
    loss_total,
    lr_text,
    nanmedian_of,
    quiet,
    weights_over_start,
    window,
)


def _loss_diverged(ctx: Context) -> None:
    """The loss rose far above its early level and stayed there (finite: NaN is `nonfinite`'s)."""
    th = ctx.th
    loss = loss_total(ctx)
    if loss is None:
        ctx.notes.append("loss_diverged: not checked, no 'loss' recorded (pass loss= to diag.step)")
        return
    if ctx.nan_step is not None:
        return  # `nonfinite` reports the growth before the NaN ("the loss grew ...x before it")
    steps, v, names = loss
    if v.size < th.diverge_min_after + 1:
        return
    w = window(v.size, th)
    base = min(float(v[0]), float(np.median(v[:w])))
    if not base > 0:
        return  # a loss that is not positive has no scale to grow from
    high = v >= th.diverge_ratio * base
    after = np.cumsum(high[::-1])[::-1] / np.arange(v.size, 0, -1)  # share of high values from i on
    onset = np.flatnonzero(high & (after >= th.diverge_persist))
    if not onset.size:
        return
    i0 = int(onset[0])
    tail = float(np.median(v[-w:]))
    if v.size - i0 < th.diverge_min_after or tail < th.diverge_ratio * base:
        return
    level = float(np.median(v[i0:]))
    peak = float(v[i0:].max())
    severity = "error" if level >= th.diverge_error_ratio * base else "warning"
    name = metadata.TOTAL_LOSS if names == [metadata.TOTAL_LOSS] else " + ".join(names)
    clipping = "grad_norm_preclip" in ctx.series
    ctx.add(
        "loss_diverged", severity, names, int(steps[i0]), int(steps[-1]),
        f"Loss diverged: '{name}' rose at step {int(steps[i0])} from {fmt(base)} early on to {fmt(level)} "
        f"(median since, {fmt(level / base)}×; peak {fmt(peak)}) and it stays there ({fmt(tail)} at the end).",
        advice.diverged(ctx.model, lr_text(ctx), clipping),
    )
    ctx.mark_primary()


def _weight_norm_growth(ctx: Context) -> None:
    """Weight tensors whose norm runs away (10x its start, 100x: error)."""
    th = ctx.th
    got = ctx.get("weight_norm_growth", "weight_norm")
    if got is None:
        return
    (wn,) = got
    steps, wv = ctx.before_cutoff(wn)
    if steps.size < 2:
        return
    cols = [j for j, n in enumerate(wn.layers) if not is_bias(n)]
    if not cols:
        return
    names = [wn.layers[j] for j in cols]
    cols = np.asarray(cols)
    first = wv[0, cols]
    ok = np.isfinite(first) & (first >= th.min_weight_norm)
    if not ok.any():
        return
    # A tiny initialisation (a zero-ish residual projection) may grow 10x healthily: measure from at
    # least a tenth of the typical tensor's start.
    ref = np.maximum(first, 0.1 * float(np.median(first[ok])))

    def growth_of(at: np.ndarray) -> np.ndarray:
        """The norms of columns `at` (of `cols`) over their start, every step (their own copy, divided in place)."""
        growth = wv[:, cols[at]]
        growth /= ref[at]
        return growth

    # A block of tensors at a time: the growth of thousands of tensors over a long run is not held.
    w = window(steps.size, th)
    tail, peak = np.full(cols.size, np.nan), np.full(cols.size, np.nan)
    for lo, hi in blocks(cols.size, steps.size):
        growth = growth_of(np.arange(lo, hi))
        tail[lo:hi] = quiet(np.nanmedian, growth[-w:], axis=0)
        peak[lo:hi] = quiet(np.nanmax, growth, axis=0)
    hit = [j for j in range(len(names)) if ok[j] and np.isfinite(tail[j]) and tail[j] >= th.weight_growth_ratio]
    if not hit:
        return
    worst = max(float(peak[j]) for j in hit)
    growth = growth_of(np.asarray(hit))  # the tensors that ran away only
    at = [int(np.flatnonzero(growth[:, k] >= th.weight_growth_ratio)[0]) for k in range(len(hit))]
    onset = min(at)
    layers = [names[j] for j in sorted(hit, key=lambda j: -float(tail[j]))]
    severity = "error" if worst >= th.weight_growth_error else "warning"
    fast = _fastest_tenfold(steps, growth)
    ctx.add(
        "weight_norm_growth", severity, layers, int(steps[onset]), int(steps[-1]),
        f"Weight norms run away: {len(layers)} tensor(s) ({ctx.layer_list(layers)}) end at "
        + (f"{fmt(float(np.min(tail[hit])))}×" if len(hit) == 1 else
           f"between {fmt(float(np.min(tail[hit])))}× and {fmt(float(np.max(tail[hit])))}×")
        + f" their start (up to {fmt(worst)}×){fast}; healthy runs stay under 2×.",
        f"The updates are too large for these weights: lower the learning rate"
        f"{advice.lr_of(ctx.model, lr_text(ctx))}, add weight decay and gradient clipping.",
    )
    if severity == "error":
        ctx.mark_primary()


def _fastest_tenfold(steps: np.ndarray, growth: np.ndarray) -> str:
    """', 30x within 10 steps (140-150)': the largest growth over any 10 training steps, when >= 10x."""
    best, at = 0.0, None
    for i in range(steps.size):
        j = int(np.searchsorted(steps, steps[i] + 10, side="right")) - 1
        if j <= i:
            continue
        r = quiet(np.nanmax, growth[j] / growth[i])
        if np.isfinite(r) and r > best:
            best, at = float(r), (int(steps[i]), int(steps[j]))
    if at is None or best < 10:
        return ""
    return f", {fmt(best)}× within {at[1] - at[0]} steps (from step {at[0]} to {at[1]})"


def _weight_decay_equilibrium(ctx: Context) -> None:
    """Weight decay so strong (lr x weight_decay) that it pins or shrinks the weights."""
    th = ctx.th
    products = ctx.model.decay_products()
    if not products:
        if not ctx.model.groups:
            _shrink_without_optimizer(ctx)
        return
    peak_lr = _peak_lr(ctx)
    scored = []
    for i, (_, lr, wd) in enumerate(products):
        lr_used = peak_lr[i] if peak_lr is not None and i < len(peak_lr) else lr
        scored.append((lr_used * wd, lr_used, wd))
    prod, lr, wd = max(scored)
    if prod < th.decay_product_high:
        return
    shrink = _median_shrink(ctx)
    ur = ctx.series.get("update_ratio")
    pinned = None
    if ur is not None and ur.steps.size:
        _, uv = ctx.before_cutoff(ur)
        cols = [j for j, n in enumerate(ur.layers) if not is_bias(n)] or list(range(len(ur.layers)))
        pinned = nanmedian_of(uv, cols)  # the float32 values, not their float64 copy
    if shrink is None or shrink[0] > th.decay_shrink:
        return  # weights that hold or grow are not pinned by the decay (a high lr with default decay)
    steps = ctx.series["weight_norm"].steps if "weight_norm" in ctx.series else np.zeros(1, dtype=np.int64)
    what = []
    what.append(f"the median weight tensor's norm went to {fmt(shrink[0])}× its start")
    if pinned is not None and pinned >= 1e-2:
        what.append(f"update ratios stay at {fmt(pinned)} (healthy ~1e-3): each step undoes the decay")
    layers = list(ctx.series["weight_norm"].layers) if "weight_norm" in ctx.series else []
    of = f" of {ctx.model.optimizer}" if ctx.model.optimizer else ""
    if wd <= th.decay_usual_wd:  # a usual decay: the learning rate makes the product large
        suggestion = (
            f"The learning rate ({fmt(lr)}) is too high: weight_decay{of} ({fmt(wd)}) is usual, but each step "
            f"decays the weights by lr x weight_decay. Lower the learning rate to about {fmt(1e-4 / max(wd, 1e-12))} "
            "or below (so that lr x weight_decay is ~1e-4), with warm-up and gradient clipping."
        )
    else:
        suggestion = (
            f"Lower weight_decay{of} to about {fmt(1e-4 / max(lr, 1e-12))} (so that lr x weight_decay is ~1e-4; "
            "AdamW typically 0.01-0.1), and exclude biases and normalisation gains from it."
        )
    ctx.add(
        "weight_decay_equilibrium", "warning", [n for n in layers if not is_bias(n)] or layers,
        int(steps[0]), int(steps[-1]),
        f"Weight decay dominates: lr x weight_decay = {fmt(lr)} x {fmt(wd)} = {fmt(prod)} per step "
        f"(usual: 1e-5 to 1e-3), so the weights sit at an equilibrium forced by the decay; " + "; ".join(what) + ".",
        suggestion,
    )
    ctx.mark_primary()


def _peak_lr(ctx: Context) -> Optional[list[float]]:
    """The largest recorded learning rate per parameter group, or None."""
    s = ctx.series.get("learning_rate")
    if s is None or not s.steps.size:
        return None
    v = np.where(s.present, s.values.astype(np.float64), np.nan)
    peak = quiet(np.nanmax, v, axis=0)
    return [float(x) for x in peak]


def _median_shrink(ctx: Context) -> Optional[tuple[float, int]]:
    """(the median weight tensor's norm at the end over its start, last step) or None."""
    got = weights_over_start(ctx)
    if got is None:
        return None
    steps, width, ratio_of = got
    tail = slice(steps.size - window(steps.size, ctx.th), steps.size)
    end = np.concatenate([quiet(np.nanmedian, ratio_of(tail, slice(lo, hi)), axis=0)
                          for lo, hi in blocks(width, tail.stop - tail.start)])
    return float(np.nanmedian(end)), int(steps[-1])


def _shrink_without_optimizer(ctx: Context) -> None:
    """No optimizer settings recorded: weights that collapse as a whole are still named, as likely decay."""
    shrink = _median_shrink(ctx)
    if shrink is None:
        ctx.notes.append("weight_decay_equilibrium: not checked, no optimizer settings and no 'weight_norm'")
        return
    if shrink[0] > ctx.th.decay_collapse:
        return
    wn = ctx.series["weight_norm"]
    layers = [n for n in wn.layers if not is_bias(n)] or list(wn.layers)
    ctx.add(
        "weight_decay_equilibrium", "warning", layers, int(wn.steps[0]), shrink[1],
        f"Weights collapse: the median weight tensor's norm went to {fmt(shrink[0])}× its start. The run "
        "does not record the optimizer's settings, but weight decay far above the usual range (lr x "
        "weight_decay over ~1e-3 per step) does exactly this.",
        "Check weight_decay (AdamW typically 0.01-0.1 at lr ~1e-3; lr x weight_decay ~1e-4) and any L2 term in "
        "the loss; pass optimizer= to Diagnostics so that the report can quote them.",
    )
    ctx.mark_primary()


LOSS_DIVERGED = Rule("loss_diverged", ("loss_diverged",), ("loss", "learning_rate", "grad_norm_preclip"),
                     _loss_diverged, after=CUTOFF, severities=("error", "warning"),
                     consequence_of=("lr_unbounded", "grad_not_reset", "gradient_spike"))
WEIGHT_NORM_GROWTH = Rule("weight_norm_growth", ("weight_norm_growth",), ("weight_norm", "learning_rate"),
                          _weight_norm_growth, after=CUTOFF, severities=("error", "warning"),
                          consequence_of=("lr_unbounded", "grad_not_reset", "gradient_spike"))
WEIGHT_DECAY_EQUILIBRIUM = Rule(
    "weight_decay_equilibrium", ("weight_decay_equilibrium",), ("weight_norm", "update_ratio", "learning_rate"),
    _weight_decay_equilibrium, after=CUTOFF, severities=("warning",),
)
