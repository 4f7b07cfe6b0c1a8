"""Findings rules on gradients: `nonfinite` (where NaN/Inf started; sets the cutoff the
other rules respect), `exploding_gradient` and `vanishing_gradient`."""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import numpy as np

from tb_diag_plugin import metadata
from tb_diag_plugin.findings import advice
from tb_diag_plugin.findings.context import (
    CAUSE_KINDS,
    CUTOFF,
    Context,
    Rule,
    blocks,
    fmt,
    is_bias,
    lr_text,
    model_column,
    persistent,
    positions,
    quiet,
    read_rows,
    row_spans,
    sibling_weight,
    smaller,
    total_grad,
    window,
)
from tb_diag_plugin.findings.series import Series
from tb_diag_plugin.findings.thresholds import Thresholds


def _nonfinite(ctx: Context) -> None:
    """NaN/Inf in the loss, gradients, weights or activations: where it started."""
    # (what, series, which cells are bad in rows lo..hi-1): each source is scanned a span of rows at a time,
    # so that no [steps x tensors] mask of a big run is held, nor more than a span of a metric read in pieces.
    sources: list[tuple[str, Series, Callable[[int, int], np.ndarray]]] = []
    loss = ctx.series.get("loss")
    if loss is not None and loss.steps.size:
        sources.append(("loss", loss, functools.partial(_bad_cells, loss)))
    grad = ctx.series.get("grad_norm")
    if grad is not None and grad.steps.size:
        nf = ctx.series.get("grad_nonfinite")
        if not (nf is not None and nf.layers == grad.layers and np.array_equal(nf.steps, grad.steps)):
            nf = None
        by_design = _amp_by_design(ctx, grad.steps)
        ctx.amp_skipped = grad.steps[by_design]
        sources.append(("gradients", grad, functools.partial(_bad_cells, grad, nonfinite=nf, by_design=by_design)))
    weights = ctx.series.get("weight_norm")
    if weights is not None and weights.steps.size:
        sources.append(("weights", weights, functools.partial(_bad_cells, weights)))
    act = ctx.series.get("act_mean")
    if act is not None and act.steps.size:
        sources.append(("activations", act, functools.partial(_bad_cells, act)))
    if not sources:
        ctx.notes.append("nonfinite: not checked, no loss, gradient, weight or activation metrics recorded")
        return
    firsts = {}
    for what, s, bad in sources:
        bad_rows = np.zeros(s.steps.size, dtype=bool)
        for lo, hi in row_spans(s):
            bad_rows[lo:hi] = bad(lo, hi).any(axis=1)
        hit = np.flatnonzero(bad_rows)
        if hit.size:
            firsts[what] = (int(s.steps[hit[0]]), int(s.steps[hit[-1]]), int(hit.size))
    if not firsts:
        return
    first = min(f[0] for f in firsts.values())
    last = max(f[1] for f in firsts.values())
    ctx.nan_step = ctx.cutoff = first
    ctx.nan_first = {what: f[0] for what, f in firsts.items()}
    layers: list[str] = []
    parts: list[str] = []
    for what, s, bad in sources:
        if what not in firsts:
            continue
        f0 = firsts[what][0]
        if f0 == first:
            row = int(np.flatnonzero(s.steps == first)[0])
            names = [s.layers[j] for j in np.flatnonzero(bad(row, row + 1)[0])]
            layers += names
            parts.append(f"{what} {ctx.layer_list(names, 3)} ({len(names)}/{len(s.layers)})")
        else:
            parts.append(f"{what} from step {f0}")
    steps_bad = max(f[2] for f in firsts.values())
    before = _growth_before(ctx, first)
    true_first = _first_between(ctx, first)
    at = (f"step {true_first} (between logged steps; first seen at logged step {first})"
          if true_first is not None and true_first < first else f"step {first}")
    clip = "add gradient clipping (torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))"
    sudden = ("look for log(0), division by zero, sqrt at 0 or exp overflow in the loss and the model (add an "
              "eps or clamp, use F.log_softmax / F.binary_cross_entropy_with_logits), and for bad values in the "
              "batch; torch.autograd.set_detect_anomaly(True) names the operation")
    if before is not None:
        cause = f"{before} before it"
        suggestion = (f"The run diverged: lower the learning rate (try 10× lower), {clip} or a warm-up, and check "
                      "the initialisation.")
    elif _watched_before(ctx, first):
        cause = "with no growth of the gradients or the loss before it"
        suggestion = f"A sudden NaN/Inf points at the computation, not the step size: {sudden}."
    else:
        prev = _logged_before(ctx, first)
        cause = ("no growth on the logged steps before it; the steps "
                 + (f"between {prev} and {first} " if prev is not None else "before it ")
                 + "were not observed, so a blow-up there cannot be ruled out")
        suggestion = (f"If the gradients blew up between logged steps (likely in recurrent nets): {clip} and "
                      f"lower the learning rate; if it came suddenly: {sudden}. Logging every step "
                      "(log_every=1) around it, or the logger's between-steps maxima, tell the two apart.")
    ctx.add(
        "nonfinite", "error", layers, first, last,
        f"NaN/Inf: first at {at} ({cause}): " + "; ".join(parts)
        + f"; {steps_bad} logged step(s) affected, last at {last}.",
        suggestion,
    )
    ctx.mark_primary()


def _bad_cells(s: Series, lo: int, hi: int, nonfinite: Optional[Series] = None,
               by_design: Optional[np.ndarray] = None) -> np.ndarray:
    """Which recorded cells of rows lo..hi-1 of `s` are NaN/Inf; with the gradients, also those whose
    `nonfinite` count is above zero or unknown (NaN), except on the rows skipped `by_design` (AMP)."""
    values, present = read_rows(s, lo, hi)
    bad = present & ~np.isfinite(values)
    if nonfinite is not None:
        nv, npresent = read_rows(nonfinite, lo, hi)
        bad |= npresent & ~(nv <= 0)  # a count above zero, or unknown (NaN)
    if by_design is not None:
        bad &= ~by_design[lo:hi, None]
    return bad


def _logged_before(ctx: Context, step: int) -> Optional[int]:
    """The logged step before `step` (of the loss or the gradients), or None."""
    prev = [int(s.steps[s.steps < step].max()) for m in ("loss", "grad_norm", "grad_norm_total")
            if (s := ctx.series.get(m)) is not None and (s.steps < step).any()]
    return max(prev) if prev else None


def _first_between(ctx: Context, step: int) -> Optional[int]:
    """The first non-finite step the logger saw between logged steps, as recorded at logged step `step`."""
    col = model_column(ctx, "nonfinite_first_step")
    if col is None:
        return None
    steps, v = col
    hit = np.isfinite(v) & (steps <= step) & (steps >= (_logged_before(ctx, step) or -1))
    return int(v[hit].min()) if hit.any() else None


def _watched_before(ctx: Context, step: int) -> bool:
    """Whether every step before `step` was observed: logged one by one, or covered by finite
    between-steps maxima of the gradient norm and the loss."""
    prev = _logged_before(ctx, step)
    if prev is None:
        return False
    if step - prev <= 1:
        return True
    for m in ("grad_norm_max_between", "loss_max_between"):
        s = ctx.series.get(m)
        if s is None or not s.steps.size:
            return False
        row = np.flatnonzero(s.steps == step)
        # NaN: not measured, or a maximum that a non-finite value swallowed: growth before it is unknown.
        if not row.size or not s.present[row[0], 0] or not np.isfinite(s.values[row[0], 0]):
            return False
    return True


def _amp_by_design(ctx: Context, steps: np.ndarray) -> np.ndarray:
    """Per step: the GradScaler skipped it (non-finite gradients are expected), scale still sane."""
    out = np.zeros(steps.shape, dtype=bool)
    skipped = ctx.series.get("amp_skipped")
    if skipped is None or not skipped.steps.size:
        return out
    scale = ctx.series.get("amp_scale")
    sk = {int(s): bool(v >= 0.5) for s, v in zip(skipped.steps, np.nan_to_num(skipped.values[:, 0]))}
    sc = {}
    if scale is not None and scale.steps.size:
        sc = {int(s): float(v) for s, v in zip(scale.steps, scale.values[:, 0])}
    for i, s in enumerate(steps):
        s = int(s)
        if sk.get(s, False):
            value = sc.get(s, math.inf)
            out[i] = not (math.isfinite(value) and value < ctx.th.amp_min_scale)
    return out


def _growth(v: np.ndarray, th: Thresholds) -> Optional[float]:
    """How many times its start (first value, or the early median if lower) `v` reached at its end."""
    if v.size < 2:
        return None
    base = min(float(v[0]), float(np.median(v[: window(v.size, th)])))
    peak = float(v[-min(3, v.size):].max())
    return peak / base if base > 0 else None


def _growth_before(ctx: Context, first_bad: int) -> Optional[str]:
    """'gradients grew 1e6x' (or the loss) up to the first NaN/Inf, when something grew 10x or more."""
    found = []
    tg = total_grad(ctx)
    if tg is not None:
        steps, v = tg
        between = model_column(ctx, "grad_norm_max_between")
        if between is not None:  # the largest norm on the unlogged steps up to each logged one
            bsteps, bv = between
            common, ti, bi = np.intersect1d(steps, bsteps, return_indices=True)
            v = v.copy()
            v[ti] = np.fmax(v[ti], np.where(np.isfinite(bv[bi]), bv[bi], np.nan))
            extra = np.isin(steps, common[np.isfinite(bv[bi])]) & (steps == first_bad)
            keep = ((steps < first_bad) | extra) & np.isfinite(v)
        else:
            keep = (steps < first_bad) & np.isfinite(v)
        found.append(("gradients", _growth(v[keep], ctx.th)))
    loss = ctx.series.get("loss")
    if loss is not None and metadata.TOTAL_LOSS in loss.layers and loss.steps.size:
        v = np.where(loss.present[:, loss.layers.index(metadata.TOTAL_LOSS)],
                     loss.values[:, loss.layers.index(metadata.TOTAL_LOSS)].astype(np.float64), np.nan)
        found.append(("the loss", _growth(v[(loss.steps <= first_bad) & np.isfinite(v)], ctx.th)))
    grew = [(what, g) for what, g in found if g is not None and g >= 10]
    if not grew:
        return None
    what, g = max(grew, key=lambda t: t[1])
    return f"{what} grew {fmt(g)}×"


def _exploding(ctx: Context) -> None:
    th = ctx.th
    got = ctx.get("exploding_gradient", "grad_norm", why="gradients are recorded on logged steps after backward")
    if got is None:
        return
    (g,) = got
    steps, gv = ctx.before_cutoff(g)
    if steps.size == 0:
        return
    flagged: dict[str, None] = {}
    first = last = blowup = None
    detail = []

    # 1. Growth of the total norm over its own start.
    tg = total_grad(ctx)
    if tg is not None:
        tsteps, tv = tg
        keep = np.isin(tsteps, steps) & np.isfinite(tv)
        tsteps, tv = tsteps[keep], tv[keep]
        if tv.size >= 2:
            # The start is the first value (a run can blow up within its first few logged steps),
            # or the early median when that is lower.
            w = window(tv.size, th)
            base = min(float(tv[0]), float(np.median(tv[:w])))
            high = tv >= th.explode_growth * base if base > 0 else np.zeros(tv.shape, dtype=bool)
            high[0] = False
            run_ok = high[1:] & high[:-1]
            ends_in_nan = ctx.nan_step is not None and high.size and high[-1]
            if run_ok.any() or ends_in_nan:
                hit = np.flatnonzero(high)
                first, last = int(tsteps[hit[0]]), int(tsteps[hit[-1]])
                peak = float(tv[hit].max())
                rows = np.isin(steps, tsteps[hit])
                lbase = np.fmin(gv[0], quiet(np.nanmedian, gv[: window(gv.shape[0], th)], axis=0))
                lpeak = quiet(np.nanmax, gv[rows], axis=0)
                grew = [g.layers[j] for j in range(len(g.layers))
                        if lbase[j] > 0 and lpeak[j] >= th.explode_growth * lbase[j]]
                for n in grew or g.layers:
                    flagged[n] = None
                detail.append(
                    f"the total gradient norm grew from {fmt(base)} to {fmt(peak)} "
                    f"({fmt(peak / base)}×) by step {last}"
                    + (", then NaN/Inf" if ctx.nan_step is not None else "")
                )
                blowup = first

    # 2. Gradients that overflowed: non-finite while the loss was finite, or while other layers'
    #    gradients were finite but far above their start (a NaN loss, e.g. log(0), is not this).
    grads_first = ctx.nan_step is not None and ctx.nan_first.get("gradients") == ctx.nan_step
    if blowup is None and grads_first:
        over = _overflow(ctx, g, th)
        if over is not None:
            names, why = over
            for n in names:
                flagged[n] = None
            first = ctx.nan_step if first is None else min(first, ctx.nan_step)
            last = ctx.nan_step if last is None else max(last, ctx.nan_step)
            blowup = ctx.nan_step
            detail.append(why)

    # 3. Gradients far larger than the weights they update.
    w_series = ctx.series.get("weight_norm")
    if w_series is not None and w_series.steps.size:
        got_ratio = _per_weight(g, w_series, ctx, th)
        if got_ratio is not None:
            rsteps, names, ratio_of = got_ratio
            worst = []
            # A block of tensors at a time: the ratios of thousands of tensors over a long run are not held.
            for lo, hi in blocks(len(names), rsteps.size):
                ratio = ratio_of(lo, hi)
                valid = np.isfinite(ratio)
                for j, n in enumerate(names[lo:hi]):
                    if is_bias(n):
                        continue  # a bias near 0 makes any gradient look huge next to it
                    span = persistent(ratio[:, j] >= th.explode_grad_to_weight, valid[:, j], th)
                    if span is not None:
                        flagged[n] = None
                        worst.append(float(quiet(np.nanmedian, ratio[:, j])))
                        first = int(rsteps[span[0]]) if first is None else min(first, int(rsteps[span[0]]))
                        last = int(rsteps[span[1]]) if last is None else max(last, int(rsteps[span[1]]))
            if worst:
                detail.append(
                    f"{len(worst)} tensor(s) have gradients "
                    + (f"{fmt(min(worst))}×" if min(worst) == max(worst) else
                       f"from {fmt(min(worst))}× to {fmt(max(worst))}×")
                    + " their weight norm (healthy: below 1)"
                )
    if not flagged:
        return
    if blowup is not None and ctx.nan_step is not None:
        # From here on the run blows up into NaN: what the other rules would see is its consequence.
        ctx.cutoff = min(ctx.nan_step, blowup)
    layers = ctx.in_model_order(flagged)
    severity = "error" if ctx.nan_step is not None else "warning"
    ctx.add(
        "exploding_gradient", severity, layers, first, last,
        f"Exploding gradients: in {ctx.layer_list(layers)}, " + "; ".join(detail) + ".",
        advice.exploding(ctx.model, lr_text(ctx), "grad_norm_preclip" in ctx.series),
    )
    ctx.mark_primary()


def _overflow(ctx: Context, g: Series, th: Thresholds) -> Optional[tuple[list[str], str]]:
    """At the first non-finite gradient step: the layers that overflowed, and why it is an overflow."""
    step = ctx.nan_step
    rows = np.flatnonzero(g.steps == step)
    if not rows.size:
        return None
    before = g.steps < step
    # Only the rows up to that step are read (of a big run, read in pieces, not the whole metric).
    hi = max(int(rows[0]), int(np.flatnonzero(before)[-1]) if before.any() else 0) + 1
    values, present = read_rows(g, 0, hi)
    row = np.where(present[rows[0]], values[rows[0]].astype(np.float64), np.nan)
    before = before[:hi]
    if before.any():
        early = np.where(present[before], values[before].astype(np.float64), np.nan)
        base = np.fmin(early[0], quiet(np.nanmedian, early[: window(early.shape[0], th)], axis=0))
    else:
        base = np.full(row.shape, np.nan)
    grown = np.isfinite(row) & (row >= th.explode_growth * base)
    loss = ctx.series.get("loss")
    loss_ok = None
    if loss is not None and metadata.TOTAL_LOSS in loss.layers:
        lr = np.flatnonzero(loss.steps == step)
        if lr.size and loss.present[lr[0], loss.layers.index(metadata.TOTAL_LOSS)]:
            v = float(loss.values[lr[0], loss.layers.index(metadata.TOTAL_LOSS)])
            loss_ok = v if math.isfinite(v) else None
    if not grown.any() and loss_ok is None:
        return None
    names = [n for j, n in enumerate(g.layers) if grown[j] or np.isposinf(row[j])]
    why = f"gradients overflowed to inf at step {step}"
    if loss_ok is not None:
        why += f" while the loss was still finite ({fmt(loss_ok)})"
    if grown.any():
        least = float(np.nanmin(row[grown] / base[grown]))
        why += f"; {int(grown.sum())} layer(s) were at {fmt(least)}× their start or more"
    return names or list(g.layers), why


def _per_weight(g: Series, w: Series, ctx: Context, th: Thresholds):
    """(common steps, layers with both norms, ratio_of) or None: ratio_of(lo, hi) is the grad/weight norm
    of those layers lo..hi-1 at the common steps, NaN where the weight norm is negligible."""
    gsteps, gv = ctx.before_cutoff(g)
    wsteps, wv = ctx.before_cutoff(w)
    common, gi, wi = np.intersect1d(gsteps, wsteps, return_indices=True)
    if common.size == 0:
        return None
    g_at, w_at = positions(g.layers), positions(w.layers)
    names = [n for n in g.layers if n in w_at]
    if not names:
        return None
    gcols = np.array([g_at[n] for n in names])
    wcols = np.array([w_at[n] for n in names])

    def ratio_of(lo: int, hi: int) -> np.ndarray:
        gm = gv[gi[:, None], gcols[None, lo:hi]]
        wm = wv[wi[:, None], wcols[None, lo:hi]]
        return np.where(wm >= th.min_weight_norm, gm / np.where(wm > 0, wm, 1.0), np.nan)

    return common, names, ratio_of


def _vanishing(ctx: Context) -> None:
    th = ctx.th
    got = ctx.get("vanishing_gradient", "grad_norm")
    if got is None:
        return
    (g,) = got
    steps, gv = ctx.before_cutoff(g)
    if steps.size == 0 or len(g.layers) < 2:
        if len(g.layers) < 2:
            ctx.notes.append("vanishing_gradient: not checked, needs gradients of two or more tensors")
        return
    ncols = len(g.layers)
    l2_of = _l2_share(ctx, steps, g.layers)
    # Per step, the largest gradient norm (the L2 term's share taken out): a block of steps at a time.
    top = np.full(steps.size, np.nan)
    has = np.zeros(steps.size, dtype=bool)
    floor = np.full(steps.size, np.nan)
    all_cols = np.arange(ncols)
    for lo, hi in blocks(steps.size, ncols):
        rows = np.arange(lo, hi)
        part = gv[lo:hi]  # read once (of a metric kept in a file, a read of every tensor)
        raw = np.where(np.isfinite(part), part, np.nan)
        if l2_of is not None:
            has[lo:hi], floor[lo:hi] = l2_of.rows(rows, raw)
            raw = l2_of.without(rows, all_cols, raw, has[lo:hi], floor[lo:hi])
        top[lo:hi] = quiet(np.nanmax, raw, axis=1)
    l2 = float(np.median(floor[has])) if l2_of is not None and has.any() else None
    valid_row = np.isfinite(top) & (top > 0)

    def columns(cols: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(raw norms, norms without the L2 share, share of the step's largest) of tensors `cols`, every step."""
        part = gv[:, cols]
        raw = np.where(np.isfinite(part), part, np.nan)
        net = raw if l2 is None else l2_of.without(np.arange(steps.size), cols, raw, has, floor)
        return raw, net, net / np.where(valid_row, top, np.nan)[:, None]

    # Per tensor, a block of tensors at a time: where its share is low or collapsed, persistently.
    w = window(steps.size, th)
    spans: dict[str, tuple[int, int]] = {}
    zero_all: dict[str, bool] = {}
    net_median = np.full(ncols, np.nan)
    for lo, hi in blocks(ncols, steps.size):
        raw, net, share = columns(np.arange(lo, hi))
        share0 = quiet(np.nanmedian, share[:w], axis=0)
        low = share < th.vanish_ratio
        collapsed = (share < th.vanish_soft_ratio) & (share < share0[None, :] / th.vanish_drop)
        cand = low | collapsed
        valid = np.isfinite(share)
        zero = np.nan_to_num(raw, nan=1.0) == 0
        net_median[lo:hi] = quiet(np.nanmedian, net, axis=0)
        for j in range(hi - lo):
            span = persistent(cand[:, j], valid[:, j], th)
            if span is not None:
                spans[g.layers[lo + j]] = span
                zero_all[g.layers[lo + j]] = bool(zero[valid[:, j], j].all())
    vanishing, no_grad, redundant = [], [], []
    at = positions(g.layers)
    for n in spans:
        j = at[n]
        if zero_all[n]:
            no_grad.append(n)
        elif is_bias(n) and sibling_weight(n) in at and sibling_weight(n) not in spans:
            # A bias is judged with its own weight: a bias right before BatchNorm/LayerNorm (or a
            # key-projection bias under softmax) gets ~0 gradient by construction, harmlessly.
            share = columns(np.array([j, at[sibling_weight(n)]]))[2]
            if quiet(lambda a, b: np.nanmedian(a / b), share[:, 0], share[:, 1]) < th.vanish_ratio:
                redundant.append(n)
        else:
            vanishing.append(n)

    if vanishing:
        idx = np.array([at[n] for n in vanishing])
        first = min(spans[n][0] for n in vanishing)
        last = max(spans[n][1] for n in vanishing)
        med = np.concatenate([quiet(np.nanmedian, columns(idx[lo:hi])[2], axis=0)
                              for lo, hi in blocks(idx.size, steps.size)])
        med = med[np.isfinite(med) & (med > 0)]
        lead = quiet(np.nanargmax, net_median)
        if med.size:
            lo, hi = float(med.min()), float(med.max())
            rng = smaller(hi) if lo == hi or hi >= 1 else f"from {fmt(1 / hi)}× to {fmt(1 / lo)}× smaller than"
        else:
            rng = "a vanishing share of"
        sat = ctx.series.get("saturation")
        hint = ""
        if sat is not None and sat.layers:
            types = sorted({t for t in sat.layer_types if t}) or ["sigmoid/tanh"]
            hint = (f" The model has {len(sat.layers)} {'/'.join(types)} activation site(s): their derivative "
                    "is at most 1/4 (sigmoid) or 1 (tanh) and far less in saturation.")
        if l2 is not None:
            hint += (f" An L2 term in the loss gives every weight a gradient of {fmt(l2)}× its norm; "
                     "beyond that, these tensors get almost nothing from the data.")
        vanishing = ctx.in_model_order(vanishing)
        weights = [n for n in g.layers if not is_bias(n)]
        # Most of the network starved far below the threshold: it cannot learn, which is an error.
        severe = (len([n for n in vanishing if not is_bias(n)]) >= th.vanish_error_share * max(1, len(weights))
                  and med.size and float(np.median(med)) <= th.vanish_error_ratio)
        ctx.add(
            "vanishing_gradient", "error" if severe else "warning", vanishing, int(steps[first]), int(steps[last]),
            f"Vanishing gradients: {len(vanishing)} tensor(s) ({ctx.layer_list(vanishing)}) get gradients {rng} "
            f"those of '{g.layers[int(lead)]}' (median over the logged steps) from step {int(steps[first])}.{hint}",
            advice.vanishing(ctx.model, lr_text(ctx)),
        )
        if severe:
            ctx.mark_primary()  # a network that cannot learn explains a loss that does not fall
    if redundant:
        first = min(spans[n][0] for n in redundant)
        last = max(spans[n][1] for n in redundant)
        ctx.add(
            "vanishing_gradient", "info", redundant, int(steps[first]), int(steps[last]),
            f"Bias without effect: {ctx.layer_list(redundant)} get gradients over {fmt(1 / th.vanish_ratio)}× "
            "smaller than those of their own weights. "
            "A bias followed by normalisation (BatchNorm/LayerNorm subtracts it again) has no effect.",
            "If the layer feeds a normalisation layer, construct it with bias=False; nothing else changes.",
        )
    # Exactly zero on every logged step (`no_grad`): the no_gradient rule names those.


class _L2Share:
    """Where the recording shows an L2 regulariser's share in the gradient norms, and the norms without it.

    `loss + lam * sum(w**2)` adds 2*lam*w to every gradient. Where the data gradient has vanished,
    that term is all that is left: several weight tensors then have the same gradient-to-weight
    ratio, 2*lam, to within a percent or two, which data gradients never do. At such steps the data
    part is estimated as sqrt(g^2 - (2*lam*|w|)^2) (the data gradient roughly orthogonal to w).
    Everything is per step, so it is worked out a block of steps (or tensors) at a time.
    """

    def __init__(self, ctx: Context, wv: np.ndarray, wrows: np.ndarray, wcols: np.ndarray,
                 weights: np.ndarray) -> None:
        self.th = ctx.th
        self.wv, self.wrows, self.wcols, self.weights = wv, wrows, wcols, weights
        self.need = max(3, math.ceil(0.25 * int(weights.sum())))

    def weight_norms(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """The weight norm of tensors `cols` at steps `rows` (NaN where not recorded)."""
        r, c = self.wrows[rows], self.wcols[cols]
        known = (r[:, None] >= 0) & (c[None, :] >= 0)
        return np.where(known, self.wv[np.maximum(r, 0)[:, None], np.maximum(c, 0)[None, :]], np.nan)

    def rows(self, rows: np.ndarray, gv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(whether the L2 share shows, its 2*lam) at steps `rows`, from their norms `gv` [rows x every tensor]."""
        wm = self.weight_norms(rows, np.arange(gv.shape[1]))
        ratio = np.where(wm >= self.th.min_weight_norm, gv / np.where(wm > 0, wm, 1.0), np.nan)
        rw = ratio[:, self.weights]
        floor = quiet(np.nanmin, rw, axis=1)
        at_floor = (rw <= floor[:, None] * self.th.l2_floor_tolerance).sum(axis=1)
        # Some tensors must stand well above the floor: when all sit on it, the regulariser swamps the
        # data everywhere (loss_component_dominance), which is not one layer starving another.
        contrast = quiet(np.nanmax, rw, axis=1) >= self.th.l2_floor_contrast * floor
        return np.isfinite(floor) & (floor > 0) & (at_floor >= self.need) & contrast, floor

    def without(self, rows: np.ndarray, cols: np.ndarray, gv: np.ndarray, has: np.ndarray,
                floor: np.ndarray) -> np.ndarray:
        """The norms `gv` of tensors `cols` at steps `rows` with the L2 share taken out where it shows."""
        wm = self.weight_norms(rows, cols)
        decay = np.where(np.isfinite(wm), floor[:, None] * wm, 0.0)
        data = np.sqrt(np.clip(gv**2 - decay**2, 0.0, None))
        return np.where(has[:, None], data, gv)


def _l2_share(ctx: Context, steps: np.ndarray, names: list[str]) -> Optional[_L2Share]:
    """The L2 share's reckoning for the gradient norms of tensors `names` at `steps`, or None without
    weight norms or with fewer than 3 weight tensors among them."""
    w = ctx.series.get("weight_norm")
    if w is None or not w.steps.size:
        return None
    wsteps, wv = ctx.before_cutoff(w)
    row_of = {int(s): i for i, s in enumerate(wsteps)}
    wrows = np.array([row_of.get(int(s), -1) for s in steps], dtype=np.int64)
    col_of = {n: j for j, n in enumerate(w.layers)}
    wcols = np.array([col_of.get(n, -1) for n in names], dtype=np.int64)
    weights = np.array([not is_bias(n) for n in names]) & (wcols >= 0)
    if weights.sum() < 3:
        return None
    return _L2Share(ctx, wv, wrows, wcols, weights)


NONFINITE = Rule(
    "nonfinite", ("nonfinite",),
    ("loss", "grad_norm", "grad_nonfinite", "weight_norm", "act_mean", "amp_skipped", "amp_scale",
     "grad_norm_total", "grad_norm_max_between", "loss_max_between", "nonfinite_first_step"),
    _nonfinite, severities=("error",), consequence_of=("grad_not_reset", "lr_unbounded"),
)
EXPLODING = Rule(
    "exploding_gradient", ("exploding_gradient",),
    ("grad_norm", "grad_norm_total", "weight_norm", "loss", "learning_rate", "grad_norm_preclip"),
    _exploding, after=("nonfinite",), severities=("error", "warning"),
    consequence_of=("not_in_optimizer", "grad_not_reset", "lr_unbounded"),
)
VANISHING = Rule(
    "vanishing_gradient", ("vanishing_gradient",), ("grad_norm", "weight_norm", "saturation", "learning_rate"),
    _vanishing,
    after=CUTOFF, severities=("error", "warning", "info"), consequence_of=CAUSE_KINDS,
)
