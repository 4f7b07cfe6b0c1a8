"""Findings rules on gradient-norm spikes, global and per tensor: `gradient_spike`.

Found the way large-model trainers find them: each logged norm against the median of a
rolling window of the previous ones, by a robust z-score (median absolute deviation) in log
space, with a spike score (the share of logged steps that spike). The logger's between-steps
maximum (`grad_norm_max_between`) shows the spikes that fall between logged steps.

A recurrent or attention model trained without clipping by an optimizer whose step follows the
gradient's size (SGD, not Adam) can blow up within its first logged steps, before any window
exists (word_language_model at lr 20 without ``--clip``): there the baseline is the first logged
norm alone (`EARLY_GRADIENT_SPIKE`)."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from tb_diag_plugin.findings.context import (
    CUTOFF,
    WIRING_CAUSES,
    Context,
    Rule,
    blocks,
    fmt,
    is_bias,
    layer_list,
    loss_total,
    model_column,
    pct,
    robust_z,
    step_noise,
    step_noise_columns,
    total_grad,
)
from tb_diag_plugin.findings.model_info import GATED_TYPES
from tb_diag_plugin.findings.thresholds import Thresholds


def spikes(v: np.ndarray, th: Thresholds, peak: Optional[np.ndarray] = None,
           draws: int = 1) -> list[tuple[int, float]]:
    """(index, size as a multiple of the running median) of each spike of a positive series `v`.

    `peak` (same length, NaN where unknown) is the largest value seen since the previous entry (the
    between-steps maximum): a spike there counts at the entry that reports it. `draws` is how many
    series are searched together (the z-score needed grows with the chances noise gets).
    """
    n = v.size
    if n < 4:
        return []
    x = _positive(v)
    cand = x if peak is None else np.fmax(x, _positive(peak))
    lx = np.log(x)
    with np.errstate(divide="ignore"):
        possible = np.flatnonzero(_possible(lx[:, None], np.log(cand)[:, None], th)[:, 0])
    return _confirm(x, lx, cand, possible[possible >= 1], step_noise(lx), _z_need(n, draws, th), th)


def column_spikes(values: np.ndarray, th: Thresholds, draws: int = 1, columns: Optional[Sequence[int]] = None,
                  block_bytes: Optional[int] = None) -> dict[int, list[tuple[int, float]]]:
    """`spikes` of every column of `values` [n, columns] (no peak), or of the `columns` given, as {position
    among them: its spikes} for the columns that have one, in order.

    The candidate bound and each column's noise are computed for a block of columns at once; only the
    columns with a candidate reach the exact per-step test, so a healthy run of thousands of tensors costs
    a few vectorised passes (the block bounds the temporaries to about `block_bytes`, default
    `_BLOCK_BYTES`, each).
    """
    n = values.shape[0]
    picked = None if columns is None else np.asarray(columns, dtype=np.int64)
    width = values.shape[1] if picked is None else picked.size
    out: dict[int, list[tuple[int, float]]] = {}
    if n < 4:
        return out
    z_need = _z_need(n, draws, th)
    for lo, hi in blocks(width, n, block_bytes or _BLOCK_BYTES):
        x = _positive(values[:, lo:hi] if picked is None else values[:, picked[lo:hi]])
        lx = np.log(x)
        possible = _possible(lx, lx, th)
        possible[0] = False  # the first entry has no window
        possible = _screen(lx, possible, th)
        cols = np.flatnonzero(possible.any(axis=0))
        if not cols.size:
            continue
        noise = step_noise_columns(lx[:, cols])
        for j, sigma in zip(cols.tolist(), noise.tolist()):
            found = _confirm(x[:, j], lx[:, j], x[:, j], np.flatnonzero(possible[:, j]), sigma, z_need, th)
            if found:
                out[lo + j] = found
    return out


# Bytes of one temporary [n, columns] array in `column_spikes`.
_BLOCK_BYTES = 4 << 20


def _positive(v: np.ndarray) -> np.ndarray:
    """`v` as float64 with NaN where it is not finite and positive (a norm's log is defined there)."""
    v = np.asarray(v, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.where(np.isfinite(v) & (v > 0), v, np.nan)


def _z_need(n: int, draws: int, th: Thresholds) -> float:
    """The robust z a spike needs among `draws` series of `n` entries: more chances, a higher bar."""
    return max(th.grad_spike_z, math.sqrt(2 * math.log(max(2, n * draws))) + 1.0)


def _possible(lx: np.ndarray, lcand: np.ndarray, th: Thresholds) -> np.ndarray:
    """Per entry of each column [n, columns], whether it can be a spike: its candidate (log) at least
    log(grad_spike_ratio) above the smallest finite log value of the `grad_spike_window` entries before it.

    Only such a value can be grad_spike_ratio times the window's median, so the exact test (a median per
    entry) runs on these alone. The rolling minimum is built by doubling windows (min is exact whatever
    the grouping), without a [n, columns, window] view.
    """
    w = th.grad_spike_window
    padded = np.concatenate([np.full((w, lx.shape[1]), np.inf), np.where(np.isfinite(lx), lx, np.inf)])
    span = 1
    while 2 * span <= w:  # padded[i] becomes the min of the `2 * span` entries from i
        padded = np.minimum(padded[:-span], padded[span:])
        span *= 2
    prev_min = np.minimum(padded[: lx.shape[0]], padded[w - span: w - span + lx.shape[0]])
    with np.errstate(invalid="ignore"):
        return lcand - prev_min >= math.log(th.grad_spike_ratio)


def _screen(lx: np.ndarray, possible: np.ndarray, th: Thresholds) -> np.ndarray:
    """`possible` [n, columns] without the candidates that cannot pass `_confirm`'s ratio test, judged for
    all at once: the window's median, once the earlier spikes are left out, is at least the finite value
    of rank (N - r - 1) // 2 of the window (N finite values, r of them candidates, the most that can be
    spikes), so a candidate below grad_spike_ratio times that value is below it times the median too."""
    rows, cols = np.nonzero(possible)
    if not rows.size:
        return possible
    w = th.grad_spike_window
    at = rows[:, None] - w + np.arange(w)  # the window's rows, negative before the start
    inside = at >= 0
    window = np.where(inside, lx[np.maximum(at, 0), cols[:, None]], np.nan)
    finite = np.isfinite(window)
    count = finite.sum(axis=1)
    spikes_at_most = (possible[np.maximum(at, 0), cols[:, None]] & inside & finite).sum(axis=1)
    rank = np.maximum(0, (count - spikes_at_most - 1) // 2)
    window.sort(axis=1)  # NaN last: rank k is the k-th smallest finite value
    floor = window[np.arange(rows.size), np.minimum(rank, w - 1)]
    with np.errstate(invalid="ignore"):
        # A margin for the rounding of the exact test's ratio (c / exp(median)) against this difference of logs.
        keep = (count >= 3) & ~(lx[rows, cols] - floor < math.log(th.grad_spike_ratio) - 1e-9)
    out = np.zeros_like(possible)
    out[rows[keep], cols[keep]] = True
    return out


def _confirm(x: np.ndarray, lx: np.ndarray, cand: np.ndarray, possible: np.ndarray, run_sigma: float,
             z_need: float, th: Thresholds) -> list[tuple[int, float]]:
    """The exact test of `spikes` at the candidate indices `possible` (ascending) of one series: above
    grad_spike_ratio x the median of its window (earlier spikes left out), by z_need robust standard
    deviations (at least the series' own step noise `run_sigma`), and not staying up."""
    n = x.size
    out: list[tuple[int, float]] = []
    spiked = np.zeros(n, dtype=bool)
    for i in possible.tolist():
        if i < 1:
            continue
        c = cand[i]
        if not np.isfinite(c):
            continue
        lo = max(0, i - th.grad_spike_window)
        prev = lx[lo:i][~spiked[lo:i]]
        prev = prev[np.isfinite(prev)]
        if prev.size < 3:
            continue
        base = float(np.median(prev))
        ratio = float(c) / math.exp(base)
        if ratio < th.grad_spike_ratio:
            continue
        if robust_z(math.log(float(c)), prev, floor=max(run_sigma, 1e-3)) < z_need:
            continue
        # A spike comes back: a norm that stays up is growth (exploding_gradient), not a spike.
        nxt = x[i + 1: i + 3]
        nxt = nxt[np.isfinite(nxt)]
        if nxt.size and float(nxt.min()) >= th.grad_spike_ratio * math.exp(base):
            continue
        spiked[i] = bool(np.isfinite(x[i]) and x[i] >= th.grad_spike_ratio * math.exp(base))
        out.append((i, ratio))
    return out


def _peak(ctx: Context, steps: np.ndarray) -> Optional[np.ndarray]:
    """The largest total norm since the previous logged step, at each of `steps` (NaN where unknown), or None."""
    between = model_column(ctx, "grad_norm_max_between")
    if between is None:
        return None
    bsteps, bv = between
    peak = np.full(steps.shape, np.nan)
    _, si, bi = np.intersect1d(steps, bsteps, return_indices=True)
    peak[si] = bv[bi]
    return peak


def _gradient_spike(ctx: Context) -> None:
    th = ctx.th
    tg = total_grad(ctx)
    if tg is None:
        ctx.notes.append("gradient_spike: not checked, no 'grad_norm_total' or 'grad_norm' recorded")
        return
    steps, tv = tg
    keep = steps < ctx.cutoff if ctx.cutoff is not None else np.ones(steps.shape, dtype=bool)
    steps, tv = steps[keep], tv[keep]
    peak = _peak(ctx, steps)
    found = spikes(tv, th, peak)
    # Per tensor: which tensors spike, and which first.
    per: dict[str, list[tuple[int, float]]] = {}
    g = ctx.series.get("grad_norm")
    if g is not None and g.steps.size:
        gsteps, gv = ctx.before_cutoff(g)
        cols = [j for j, n in enumerate(g.layers) if not is_bias(n)] or list(range(len(g.layers)))
        for k, s in column_spikes(gv, th, draws=len(cols), columns=cols).items():
            per[g.layers[cols[k]]] = [(int(gsteps[i]), r) for i, r in s]
    global_hits = [(int(steps[i]), r) for i, r in found]
    strong = (len(global_hits) >= th.grad_spike_min or any(r >= th.grad_spike_single for _, r in global_hits))
    tensor_strong = {n: h for n, h in per.items()
                     if len(h) >= th.grad_spike_min or any(r >= th.grad_spike_single for _, r in h)}
    if not strong and not tensor_strong:
        return
    first_tensors = sorted(tensor_strong or per, key=lambda n: ((tensor_strong or per)[n][0][0], -max(
        r for _, r in (tensor_strong or per)[n])))
    first_step = min([s for s, _ in global_hits] + [h[0][0] for h in tensor_strong.values()])
    last_step = max([s for s, _ in global_hits] + [h[-1][0] for h in tensor_strong.values()])
    parts = []
    if global_hits:
        rs = [r for _, r in global_hits]
        worst = max(global_hits, key=lambda t: t[1])
        at = ", ".join(str(s) for s, _ in global_hits[:5]) + (" ..." if len(global_hits) > 5 else "")
        size = f"{fmt(min(rs))}×" if len(rs) == 1 else f"between {fmt(min(rs))}× and {fmt(max(rs))}×"
        parts.append(f"the total gradient norm jumped to {size} its running median on {len(global_hits)} of "
                     f"{steps.size} logged steps (spike score {pct(len(global_hits) / max(1, steps.size))}; steps "
                     f"{at}), the largest at step {worst[0]}")
    if first_tensors:
        hits = tensor_strong or per
        lead = first_tensors[0]
        top = max(r for _, r in hits[lead])
        if global_hits:
            parts.append(f"first to spike: {layer_list(first_tensors)} ('{lead}' up to {fmt(top)}× its own "
                         "running median)")
        else:
            at = sorted({s for h in hits.values() for s, _ in h})
            parts.append(f"{layer_list(first_tensors)} jumped to up to {fmt(top)}× their own running median "
                         f"('{lead}' first, at step {hits[lead][0][0]}) on {len(at)} of {steps.size} logged steps "
                         f"(steps {', '.join(str(s) for s in at[:5])}{' ...' if len(at) > 5 else ''}); the total "
                         "norm hides them")
    finite = tv[np.isfinite(tv)]
    spike_idx = {i for i, _ in found}
    calm = np.array([x for i, x in enumerate(tv) if i not in spike_idx and np.isfinite(x)])
    clip = float(np.percentile(calm if calm.size else finite, th.grad_spike_clip_pct)) if finite.size else math.nan
    model = ctx.model
    recurrent = [n for n, t in model.module_types.items() if t in GATED_TYPES]
    clipped = "grad_norm_preclip" in ctx.series
    clip_text = (f"torch.nn.utils.clip_grad_norm_(model.parameters(), {fmt(clip)}) (the "
                 f"{th.grad_spike_clip_pct:.0f}th percentile of the logged norm)" if math.isfinite(clip) else
                 "torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)")
    if recurrent or model.is_transformer:
        what = "recurrent" if recurrent else "attention"
        tip = (f"Spikes like these are usual in {what} models and what gradient clipping is for: clip the norm "
               f"before optimizer.step(), {clip_text}; if they persist, lower the learning rate or add a warm-up.")
    else:
        tip = (f"Look at the batches of those steps (outliers, corrupt samples, wrong labels); clip the norm, "
               f"{clip_text}, so one batch cannot throw the weights far, or lower the learning rate.")
    severity = "warning"
    if clipped:
        severity = "info"
        tip = "Gradient clipping already caps these steps; " + tip[0].lower() + tip[1:]
    ctx.add(
        "gradient_spike", severity, first_tensors or [""], first_step, last_step,
        "Gradient spikes: " + "; ".join(parts) + ".", tip,
    )


def early_blowup(v: np.ndarray, th: Thresholds, peak: Optional[np.ndarray] = None) -> Optional[tuple[int, float]]:
    """(index, size as a multiple of the first value) of the first entry of a positive series `v`, within
    `grad_spike_early_steps` of its start, whose value or `peak` (the largest since the previous entry)
    reaches `grad_spike_ratio` times ``v[0]``; None when there is none (or no finite positive start)."""
    if v.size < 2 or not (np.isfinite(v[0]) and v[0] > 0):
        return None
    end = min(v.size, th.grad_spike_early_steps + 1)
    top = v[1:end] if peak is None else np.fmax(v[1:end], peak[1:end])
    with np.errstate(invalid="ignore"):
        hit = np.flatnonzero(np.isfinite(top) & (top >= th.grad_spike_ratio * v[0]))
    if not hit.size:
        return None
    i = int(hit[0]) + 1
    return i, float(top[i - 1]) / float(v[0])


def _early_gradient_spike(ctx: Context) -> None:
    th = ctx.th
    model = ctx.model
    recurrent = any(t in GATED_TYPES for t in model.module_types.values())
    if not (recurrent or model.is_transformer) or "grad_norm_preclip" in ctx.series:
        return  # only where clipping is the usual fix, and not already in place
    if model.adam_family:
        return  # Adam divides the spike out of the step: a blow-up there is the learning rate's (update_ratio)
    tg, loss = total_grad(ctx), loss_total(ctx)
    if tg is None or loss is None:
        return  # a blow-up is claimed only with the loss it threw up
    steps, tv = tg
    keep = steps < ctx.cutoff if ctx.cutoff is not None else np.ones(steps.shape, dtype=bool)
    steps, tv = steps[keep], tv[keep]
    peak = _peak(ctx, steps)
    hit = early_blowup(tv, th, peak)
    if hit is None:
        return
    i, ratio = hit
    if any(f.kind == "gradient_spike" and f.first_step <= steps[i] for f in ctx.findings):
        return  # the rolling test already reports this jump
    lsteps, lv = loss[0], loss[1]
    before, after = lv[lsteps < steps[i]], lv[(lsteps >= steps[i]) & (lsteps <= steps[min(i + 2, steps.size - 1)])]
    if not before.size or not after.size or float(before.min()) <= 0:
        return
    low, high = float(before.min()), float(after.max())
    if high < th.grad_spike_early_loss_rise * low:
        return
    hidden = peak is not None and np.isfinite(peak[i]) and peak[i] > tv[i]
    top = float(peak[i]) if hidden else float(tv[i])
    where = f"between steps {int(steps[i - 1])} and {int(steps[i])}" if hidden else f"at step {int(steps[i])}"
    # Which tensors jumped: each against its own first logged norm, at the jump's step.
    jumped: list[str] = []
    g = ctx.series.get("grad_norm")
    if g is not None and g.steps.size:
        gsteps, gv = ctx.before_cutoff(g)
        at = np.flatnonzero(gsteps <= steps[i])
        if at.size >= 2:
            with np.errstate(invalid="ignore", divide="ignore"):  # fmax skips NaN without an all-NaN warning
                grow = np.fmax.reduce(gv[at[1:]], axis=0) / gv[at[0]]
            order = np.argsort(-np.where(np.isfinite(grow), grow, -np.inf))
            jumped = [g.layers[j] for j in order if np.isfinite(grow[j]) and grow[j] >= th.grad_spike_ratio
                      and not is_bias(g.layers[j])]
    first = float(tv[0])
    what = "recurrent" if recurrent else "attention"
    ctx.add(
        "gradient_spike", "warning", jumped or [""], int(steps[i]), int(steps[min(i + 2, steps.size - 1)]),
        f"Gradient spikes: the total gradient norm jumped from {fmt(first)} at step {int(steps[0])} to "
        f"{fmt(top)} ({fmt(ratio)}×) {where}, within the first logged steps (before a running median exists)"
        + (f", led by {layer_list(jumped)}" if jumped else "")
        + f"; the loss rose from {fmt(low)} to {fmt(high)} after it.",
        f"A {what} model without gradient clipping: clip the norm before optimizer.step(), "
        f"torch.nn.utils.clip_grad_norm_(model.parameters(), {fmt(first)}) (the norm before the jump); if it "
        "persists, lower the learning rate or add a warm-up.",
    )
    ctx.mark_primary()  # the updates, weights and loss it throws up fold below it


GRADIENT_SPIKE = Rule(
    "gradient_spike", ("gradient_spike",),
    ("grad_norm_total", "grad_norm", "grad_norm_max_between", "grad_norm_preclip"),
    _gradient_spike, after=CUTOFF, severities=("warning", "info"),
    consequence_of=("exploding_gradient", "nonfinite", "grad_not_reset", "lr_unbounded", "loss_diverged",
                    "weight_norm_growth", "update_ratio", "not_in_optimizer"),
)
# Its own rule, because its causes differ: a blow-up this early is what makes the updates too large,
# the weights run away and the loss diverge, so those fold below it (it marks itself a cause; the
# rolling finding above never does, and folds below them instead).
EARLY_GRADIENT_SPIKE = Rule(
    "gradient_spike_early", ("gradient_spike",), ("grad_norm_total", "grad_norm", "grad_norm_max_between",
                                                  "grad_norm_preclip", "loss"),
    _early_gradient_spike, after=CUTOFF + ("gradient_spike",), severities=("warning",),
    consequence_of=WIRING_CAUSES + ("exploding_gradient", "nonfinite"),
)
