"""Findings rule on optimizer steps: `update_ratio` (||dw|| / ||w|| too large or too small)."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from tb_diag_plugin.findings import advice
from tb_diag_plugin.findings.context import (
    CUTOFF,
    Context,
    Rule,
    blocks,
    clipping_by_design,
    fmt,
    is_bias,
    lr_text,
    persistent,
    positions,
    quiet,
    read_rows,
    weights_over_start,
)


def _update_ratio(ctx: Context) -> None:
    th = ctx.th
    got = ctx.get("update_ratio", "update_ratio", why="pass optimizer= to Diagnostics")
    if got is None:
        return
    (u,) = got
    steps, uv = ctx.before_cutoff(u)
    if steps.size == 0:
        return
    # Weight tensors only: biases and norm shifts start at 0, where ||dw||/||w|| is meaningless.
    wn = ctx.series.get("weight_norm")
    cols = [j for j, n in enumerate(u.layers) if not is_bias(n)] or list(range(len(u.layers)))
    names = [u.layers[j] for j in cols]
    rows, wrows, wcols = np.arange(steps.size), None, None
    if wn is not None and wn.steps.size:
        wsteps, wv = ctx.before_cutoff(wn)
        steps, rows, wrows = np.intersect1d(steps, wsteps, return_indices=True)
        at = positions(wn.layers)
        wcols = np.array([at.get(n, -1) for n in names], dtype=np.int64)
    ucols = np.array(cols, dtype=np.int64)

    def ratios(r: np.ndarray, c: slice) -> np.ndarray:
        """The update ratios at rows `r` of `steps` of the tensors `names[c]`: NaN where not finite, or where
        the tensor's weight norm is under min_weight_norm (a block at a time: never all of a long run's)."""
        block = uv[rows[r][:, None], ucols[c][None, :]]
        if wrows is not None:
            wc = wcols[c]
            has = wc >= 0
            if has.any():
                w_at = wv[wrows[r][:, None], wc[has][None, :]]
                block[:, has] = np.where(w_at >= th.min_weight_norm, block[:, has], np.nan)
        return np.where(np.isfinite(block), block, np.nan)

    # The median and the largest ratio at each step, a block of steps at a time. For "too small", only
    # tensors that got a gradient: no gradient means no update whatever the learning rate (dead units,
    # vanishing gradients: their own rules say so).
    med, top = np.full(steps.size, np.nan), np.full(steps.size, np.nan)
    empty = True
    for lo, hi in blocks(steps.size, len(names)):
        block = ratios(np.arange(lo, hi), slice(None))
        empty = empty and bool(np.isnan(block).all())
        med[lo:hi] = quiet(np.nanmedian, block, axis=1)
        top[lo:hi] = quiet(np.nanmax, np.where(_has_grad(ctx, steps[lo:hi], names), block, np.nan), axis=1)
    if steps.size == 0 or empty:
        return

    # Too large: after the first logged step (Adam's first update is lr/rms(w) by construction).
    high = med > th.update_ratio_high
    high[0] = False
    need = max(th.update_min_points, math.ceil(th.update_min_fraction * steps.size))
    growth = _weight_growth(ctx, names)
    if high.sum() < need and growth is not None and growth[0] >= th.update_weight_growth:
        # Large updates that piled up: the weights inflated (an over-large Adam step grows the
        # weights until the ratio looks moderate again).
        g, at = growth
        ctx.add(
            "update_ratio", "warning", names, int(steps[0]), at,
            f"Updates too large: the median weight tensor's norm grew {fmt(g)}× by step {at} "
            f"(healthy runs: under 2×); update ratios median {fmt(float(np.nanmedian(med)))}, "
            f"up to {fmt(float(np.nanmax(med)))}.",
            f"The learning rate{advice.lr_of(ctx.model, lr_text(ctx))} is too high: lower it about 10×, "
            "or add weight decay, warm-up and gradient clipping.",
        )
        ctx.mark_primary()
        return
    if high.sum() >= need:
        hit = np.flatnonzero(high)
        per = np.concatenate([quiet(np.nanmedian, ratios(hit, slice(lo, hi)), axis=0)
                              for lo, hi in blocks(len(names), hit.size)])
        layers = [n for n, r in zip(names, per) if r > th.update_ratio_high] or names
        peak = float(np.nanmax(med[hit]))
        severity = "error" if peak >= 1.0 else "warning"
        if severity == "warning" and clipping_by_design(ctx):
            severity = "info"  # lr x clip threshold is the step a clipped recurrent LM is meant to take
        ctx.add(
            "update_ratio", severity, layers, int(steps[hit[0]]), int(steps[hit[-1]]),
            f"Updates too large: the median weight tensor changes by {fmt(float(np.median(med[hit])))} of its "
            f"norm per step (up to {fmt(peak)}) on {hit.size} of {steps.size} logged steps; healthy is ~1e-3.",
            advice.lr_too_high(ctx.model, lr_text(ctx),
                               fmt(10 ** max(1, round(math.log10(max(peak, 1e-12) / 1e-3) - 0.5))),
                               "grad_norm_preclip" in ctx.series),
        )
        if severity != "info":
            ctx.mark_primary()
        return

    # Too small: even the fastest-moving tensor barely moves, on most of the run.
    low = top < th.update_ratio_low
    span = persistent(low, np.isfinite(top), th)
    if span is not None and low.sum() >= max(2, math.ceil(th.persist_fraction * np.isfinite(top).sum())):
        sel = low & np.isfinite(top)
        typical = float(np.median(top[sel]))
        lr = lr_text(ctx)
        zero = typical == 0
        ctx.add(
            "update_ratio", "warning", names, int(steps[span[0]]), int(steps[span[1]]),
            ("Updates too small: the weights do not change at all (update ratio 0)" if zero else
             f"Updates too small: the fastest-moving weight tensor changes by {fmt(typical)} of its norm "
             "per step") + f" on {int(sel.sum())} of {steps.size} logged steps; healthy is ~1e-3.",
            (f"The learning rate{lr} is 0 or the optimizer does not own these parameters." if zero else
             f"The learning rate{lr} is far too low: raise it about "
             f"{fmt(10 ** max(1, round(math.log10(1e-3 / max(typical, 1e-30)) - 0.5)))}×"
             " (or check the schedule and that the optimizer owns these parameters)."),
        )


def _weight_growth(ctx: Context, names: list[str]) -> Optional[tuple[float, int]]:
    """(largest growth of the median weight tensor's norm over its first value, the step), or None."""
    got = weights_over_start(ctx, names)
    if got is None:
        return None
    steps, width, ratio_of = got
    growth = np.concatenate([quiet(np.nanmedian, ratio_of(slice(lo, hi)), axis=1)
                             for lo, hi in blocks(steps.size, width)])
    if not np.isfinite(growth).any():
        return None
    i = int(np.nanargmax(growth))
    return float(growth[i]), int(steps[i])


def _has_grad(ctx: Context, steps: np.ndarray, names: list[str]) -> np.ndarray:
    """[steps x names]: the tensor had a non-zero finite gradient at that step (True if unknown)."""
    out = np.ones((steps.size, len(names)), dtype=bool)
    g = ctx.series.get("grad_norm")
    if g is None or not g.steps.size:
        return out
    row_of = {int(s): i for i, s in enumerate(g.steps)}
    col_of = {n: j for j, n in enumerate(g.layers)}
    rows = np.array([row_of.get(int(s), -1) for s in steps], dtype=np.int64)
    cols = np.array([col_of.get(n, -1) for n in names], dtype=np.int64)
    known = (rows[:, None] >= 0) & (cols[None, :] >= 0)
    if not (rows >= 0).any():
        return out
    # Only the span of rows asked for is read (of a big run, read in pieces, not the whole metric).
    lo, hi = int(rows[rows >= 0].min()), int(rows.max()) + 1
    values, present = read_rows(g, lo, hi)
    at = np.where(rows >= 0, rows - lo, 0)[:, None]  # unknown rows read any row: `known` masks them
    vals = values[at, cols[None, :]].astype(np.float64)
    pres = present[at, cols[None, :]]
    alive = pres & np.isfinite(vals) & (vals > 0)
    return np.where(known, alive, True)


UPDATE_RATIO = Rule(
    "update_ratio", ("update_ratio",),
    ("update_ratio", "weight_norm", "grad_norm", "learning_rate", "grad_norm_preclip", "grad_norm_total", "loss"),
    _update_ratio, after=CUTOFF, severities=("error", "warning", "info"),
    consequence_of=("weight_decay_equilibrium", "lr_unbounded", "grad_not_reset", "lr_zero", "lr_collapsed",
                    "not_in_optimizer", "gradient_spike"),
)
