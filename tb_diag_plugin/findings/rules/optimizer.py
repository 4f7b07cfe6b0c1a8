"""Findings rules on what the optimizer does with the gradients: `no_gradient` (parameters it
holds that never get one), `gradient_clipping` (clipping on most steps), `adam_eps` (eps
swamping Adam's update) and `logit_growth` (the output layer's logits running away)."""

from __future__ import annotations

import numpy as np

from tb_diag_plugin.findings import advice
from tb_diag_plugin.findings.context import (
    CAUSE_KINDS,
    CUTOFF,
    Context,
    Rule,
    clipping_by_design,
    fmt,
    is_bias,
    lr_text,
    persistent,
    quiet,
    window,
)


def _no_gradient(ctx: Context) -> None:
    """Parameters the optimizer holds whose gradient was None or exactly zero on every logged step."""
    missing = ctx.series.get("grad_missing")
    grad = ctx.series.get("grad_norm")
    if (missing is None or not missing.steps.size) and (grad is None or not grad.steps.size):
        ctx.notes.append("no_gradient: not checked, no 'grad_missing' or 'grad_norm' recorded")
        return
    none: dict[str, tuple[int, int]] = {}
    zero: dict[str, tuple[int, int]] = {}
    if missing is not None and missing.steps.size:
        steps, mv = ctx.before_cutoff(missing)
        for j, n in enumerate(missing.layers):
            col = mv[:, j]
            ok = np.isfinite(col)
            if ok.sum() >= 2 and bool((col[ok] >= 0.5).all()):
                none[n] = (int(steps[ok][0]), int(steps[ok][-1]))
    elif grad is not None and grad.steps.size and "weight_norm" in ctx.series:
        # Older recordings: a parameter with weights but no gradient value on any logged step had .grad None.
        steps, pv = ctx.before_cutoff(grad)
        seen = {n for j, n in enumerate(grad.layers) if np.isfinite(pv[:, j]).any()}
        wsteps, _ = ctx.before_cutoff(ctx.series["weight_norm"])
        if steps.size >= 2 and wsteps.size >= 2:
            for n in ctx.series["weight_norm"].layers:
                if n not in seen:
                    none[n] = (int(wsteps[0]), int(wsteps[-1]))
    if grad is not None and grad.steps.size:
        steps, gv = ctx.before_cutoff(grad)
        for j, n in enumerate(grad.layers):
            col = gv[:, j]
            ok = np.isfinite(col)
            if n not in none and ok.sum() >= 2 and bool((col[ok] == 0).all()):
                zero[n] = (int(steps[ok][0]), int(steps[ok][-1]))
    model = ctx.model
    # Frozen on purpose is not a fault; where the document does not say who the optimizer holds, ask.
    none = {n: s for n, s in none.items() if not model.frozen(n)}
    zero = {n: s for n, s in zero.items() if not model.frozen(n)}
    dead = any(f.kind == "dead_relu" for f in ctx.findings)
    for group, what in ((none, "none"), (zero, "zero")):
        if not group:
            continue
        layers = list(group)
        held = [model.held(n) for n in layers]
        known_held = all(h is True for h in held)
        explained = what == "zero" and dead
        severity = "warning" if known_held and not explained else "info"
        first = min(s[0] for s in group.values())
        last = max(s[1] for s in group.values())
        if what == "none":
            msg = (f"No gradient: {len(layers)} parameter(s) ({ctx.layer_list(layers)}) had none (.grad None) on every "
                   f"logged step, from step {first} to {last}")
            tip = ("They are not part of the graph from the loss: look for .detach(), torch.no_grad() or "
                   ".data in their path, or a module that forward never calls; if that is on purpose, freeze "
                   "them (requires_grad_(False)) and leave them out of the optimizer.")
        else:
            msg = (f"No gradient: {len(layers)} parameter(s) ({ctx.layer_list(layers)}) received an exactly zero "
                   f"gradient on every logged step, from step {first} to {last}")
            tip = ("If they should learn: check that their output reaches the loss (a multiplication by 0, a "
                   "mask, a detached branch) and that the units feeding them are not dead (see dead_relu); "
                   "unused parameters are better removed or frozen (requires_grad=False).")
        if known_held:
            msg += f", although {model.optimizer or 'the optimizer'} holds them"
        elif any(h is None for h in held):
            msg += " (the run does not say whether the optimizer holds them)"
        ctx.add("no_gradient", severity, layers, first, last,
                msg + (": a consequence of the dead units." if explained else "."), tip)
        if severity == "warning":
            ctx.mark_primary()


def _gradient_clipping(ctx: Context) -> None:
    """Clipping that changes most logged steps: the step size is the problem, not outliers."""
    th = ctx.th
    got = ctx.get("gradient_clipping", "grad_norm_preclip",
                  why="diag.step(step, loss=loss, grad_norm=clip_grad_norm_(...))")
    if got is None:
        return
    (pre,) = got
    post = ctx.series.get("grad_norm_total")
    if post is None or not post.steps.size:
        return
    psteps, pv = ctx.before_cutoff(pre)
    qsteps, qv = ctx.before_cutoff(post)
    common, pi, qi = np.intersect1d(psteps, qsteps, return_indices=True)
    p, q = pv[pi, 0], qv[qi, 0]
    ok = np.isfinite(p) & np.isfinite(q) & (p > 0)
    common, p, q = common[ok], p[ok], q[ok]
    if common.size < th.clip_min_points:
        return
    clipped = q < p * (1 - 1e-3)
    share = float(clipped.mean())
    if share < th.clip_share:
        return
    p50, p90 = float(np.median(p)), float(np.percentile(p, 90))
    limit = float(np.median(q[clipped]))
    hit = np.flatnonzero(clipped)
    scale = ctx.series.get("amp_scale")
    s50 = float(quiet(np.nanmedian, ctx.before_cutoff(scale)[1])) if scale is not None and scale.steps.size else 0.0
    if s50 >= 2 and p50 >= th.clip_scaled_share * s50:
        # Under a GradScaler the .grad tensors hold loss-scale x the gradient until scaler.unscale_(): a pre-clip
        # norm of the loss scale's order is that product, so clipping cuts the true gradient by the scale.
        ctx.add(
            "gradient_clipping", "error", ["grad_norm_preclip"], int(common[hit[0]]), int(common[hit[-1]]),
            f"Clipping scaled gradients: the pre-clip norm (median {fmt(p50)}) is of the order of the AMP loss "
            f"scale ({fmt(s50)}), so clip_grad_norm_ sees the gradients still multiplied by it and cuts every step "
            f"({int(clipped.sum())} of {common.size} logged steps) to ~{fmt(limit)}: the updates shrink by the scale.",
            "Call scaler.unscale_(optimizer) after scaler.scale(loss).backward() and before clip_grad_norm_, then "
            "scaler.step(optimizer) and scaler.update().",
        )
        return
    if clipping_by_design(ctx):
        ctx.add(
            "gradient_clipping", "info", ["grad_norm_preclip"], int(common[hit[0]]), int(common[hit[-1]]),
            f"Clipping on most steps: gradient clipping changed {int(clipped.sum())} of {common.size} logged steps "
            f"(pre-clip norm median {fmt(p50)}, cut to ~{fmt(limit)}) in a recurrent model whose loss falls: the "
            "usual recipe for recurrent language models, where the clip threshold sets the step size.",
            f"Nothing to fix while the loss falls. To let the learning rate set the step instead, clip near the "
            f"pre-clip norm's 90th percentile (clip_grad_norm_(params, {fmt(p90)})).",
        )
        return
    ctx.add(
        "gradient_clipping", "warning", ["grad_norm_preclip"], int(common[hit[0]]), int(common[hit[-1]]),
        f"Clipping on most steps: gradient clipping changed {int(clipped.sum())} of {common.size} logged steps "
        f"({100 * share:.0f} %): "
        f"the pre-clip norm (median {fmt(p50)}, 90th percentile {fmt(p90)}) is cut to ~{fmt(limit)}, so "
        "the clip threshold, not the learning rate, sets the step size.",
        f"The learning rate{advice.lr_of(ctx.model, lr_text(ctx))} is too high for these gradients: lower it "
        f"until clipping is rare, or set the clip threshold near the pre-clip norm's 90th percentile "
        f"(clip_grad_norm_(params, {fmt(p90)})) so that it catches only outlier batches.",
    )


def _adam_eps(ctx: Context) -> None:
    """Weight tensors where sqrt(v_hat) < eps for most entries: eps, not the gradient, scales the step."""
    th = ctx.th
    s = ctx.series.get("adam_eps_fraction")
    if s is None or not s.steps.size:
        if ctx.model.adam_family:
            ctx.notes.append("adam_eps: not checked, no 'adam_eps_fraction' recorded")
        return
    steps, fv = ctx.before_cutoff(s)
    if not steps.size:
        return
    alive = _gets_gradient(ctx, s.layers)
    hits = []
    for j, n in enumerate(s.layers):
        if is_bias(n) or not alive.get(n, True):
            continue  # biases may get no gradient by construction (a key bias); no gradient: no_gradient
        col = fv[:, j]
        span = persistent(col >= th.adam_eps_fraction, np.isfinite(col), th)
        if span is not None:
            hits.append((n, span, float(quiet(np.nanmedian, col[span[0]: span[1] + 1]))))
    if not hits:
        return
    layers = [h[0] for h in hits]
    first = int(steps[min(h[1][0] for h in hits)])
    last = int(steps[max(h[1][1] for h in hits)])
    eps = ctx.model.hyper("eps")
    eps_text = f" (eps {fmt(max(eps))})" if eps else ""
    shares = ", ".join(f"'{n}' {100 * f:.0f} %" for n, _, f in hits[:4])
    if eps and max(eps) <= 1e-8:
        fix = ("eps is already at the usual 1e-8 or below: the gradients themselves are tiny. Check why (a loss "
               "scaled down, vanishing gradients, units that receive no input) before lowering eps further.")
    else:
        fix = (f"Lower eps{eps_text} to 1e-8 or below the gradients' RMS (under fp16/bf16 1e-6 to 1e-8 is usual), "
               "or check why the gradients are so small (loss scaled down, vanishing gradients).")
    ctx.add(
        "adam_eps", "warning", layers, first, last,
        f"Adam's eps too large: eps{eps_text} swamps the update in {len(layers)} tensor(s): sqrt(v) < eps for "
        f"{shares} of the entries, so those steps are lr × gradient / eps (plain SGD with a tiny rate), not "
        "Adam's.",
        fix,
    )
    ctx.mark_primary()  # a loss that barely moves follows from it


def _gets_gradient(ctx: Context, names: list[str]) -> dict[str, bool]:
    """Per tensor: whether it got a gradient (non-zero norm on a logged step, .grad not missing on most)."""
    out: dict[str, bool] = {}
    g = ctx.series.get("grad_norm")
    if g is not None and g.steps.size:
        _, gv = ctx.before_cutoff(g)
        out = {n: bool((np.nan_to_num(gv[:, j]) > 0).any()) for j, n in enumerate(g.layers) if n in names}
    m = ctx.series.get("grad_missing")
    if m is not None and m.steps.size:
        _, mv = ctx.before_cutoff(m)
        for j, n in enumerate(m.layers):
            if n in names and quiet(np.nanmean, mv[:, j]) >= 0.5:
                out[n] = False  # no gradient on most steps: no_gradient's, not eps's
    return out


def _logit_growth(ctx: Context) -> None:
    """The output layer's logits growing without bound: what z-loss exists for."""
    th = ctx.th
    got = ctx.get("logit_growth", "logit_max_abs")
    if got is None:
        return
    (s,) = got
    steps, v = ctx.before_cutoff(s)
    if steps.size < 2:
        return
    w = window(steps.size, th)
    for j, n in enumerate(s.layers):
        col = v[:, j]
        ok = np.isfinite(col)
        if ok.sum() < 2:
            continue
        start = float(col[ok][0])
        grown = (col >= th.logit_max) & (col >= th.logit_growth * max(start, 1e-12))
        span = persistent(grown, ok, th)
        if span is None:
            continue
        peak = float(np.nanmax(col))
        end = float(quiet(np.nanmedian, col[-w:]))
        lse = ctx.series.get("logit_lse")
        lse_text = ""
        if lse is not None and n in lse.layers:
            _, lv = ctx.before_cutoff(lse)
            lse_end = float(quiet(np.nanmedian, lv[-w:, lse.layers.index(n)]))
            if np.isfinite(lse_end):
                lse_text = f"; mean log-sum-exp {fmt(lse_end)} at the end"
        z = ("add a z-loss (1e-4 x logsumexp(logits)^2, as PaLM does) to keep the softmax normaliser near 0"
             if ctx.model.is_transformer or not ctx.model.known else
             "use label smoothing or weight decay on the last layer so that confident outputs stop growing")
        ctx.add(
            "logit_growth", "warning", [n], int(steps[span[0]]), int(steps[span[1]]),
            f"Logits growing: those of '{n}' grew from max |logit| {fmt(start)} to {fmt(end)} "
            f"(peak {fmt(peak)}){lse_text}: "
            "softmax saturates, gradients through it vanish, and low precision overflows.",
            f"Lower the learning rate{advice.lr_of(ctx.model, lr_text(ctx))}; {z}.",
        )


# After dead_relu: an all-zero gradient behind dead units is its consequence, not a detached branch.
NO_GRADIENT = Rule("no_gradient", ("no_gradient",), ("grad_missing", "grad_norm", "weight_norm"), _no_gradient,
                   after=CUTOFF + ("dead_relu",), severities=("warning", "info"))
GRADIENT_CLIPPING = Rule("gradient_clipping", ("gradient_clipping",),
                         ("grad_norm_preclip", "grad_norm_total", "learning_rate", "amp_scale", "loss"),
                         _gradient_clipping,
                         after=CUTOFF, severities=("error", "warning", "info"))
# eps swamps the update wherever the gradient itself is (near) zero: dead units, a gradient that
# vanished or never arrives, a learning rate at zero; those are the cause, not eps.
ADAM_EPS = Rule("adam_eps", ("adam_eps",), ("adam_eps_fraction", "grad_norm", "grad_missing"), _adam_eps,
                after=CUTOFF + ("dead_relu", "vanishing_gradient", "no_gradient"), severities=("warning",),
                consequence_of=("dead_relu", "vanishing_gradient", "no_gradient", "weight_decay_equilibrium",
                                "not_in_optimizer", "lr_zero", "lr_collapsed"))
LOGIT_GROWTH = Rule("logit_growth", ("logit_growth",), ("logit_max_abs", "logit_lse", "learning_rate"),
                    _logit_growth, after=CUTOFF, severities=("warning",), consequence_of=CAUSE_KINDS)
