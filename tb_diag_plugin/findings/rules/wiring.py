"""Findings rules on the training loop's own wiring, from what the logger observed of it:
`not_in_optimizer` (parameters that get gradients but no optimizer holds), `grad_not_reset`
(no zero_grad() between optimizer steps), `module_mode` (eval mode while training, training
mode while evaluating), the learning rate's course (`lr_collapsed`, `lr_unbounded`, `lr_zero`)
and `output_loss_mismatch` (outputs already squashed by softmax/sigmoid). Each names the
objects and the fix in the user's terms; the symptoms they cause declare them as causes."""

from __future__ import annotations

import math

import numpy as np

from tb_diag_plugin.findings.context import (
    CUTOFF,
    Context,
    Rule,
    fmt,
    loss_total,
    model_column,
    persistent,
    quiet,
    total_grad,
    window,
)


def _got_gradient(ctx: Context) -> dict[str, bool]:
    """Per parameter: it received a gradient on some logged step (grad_missing 0, or a finite norm above 0)."""
    out: dict[str, bool] = {}
    g = ctx.series.get("grad_norm")
    if g is not None and g.steps.size:
        _, gv = ctx.before_cutoff(g)
        for j, n in enumerate(g.layers):
            out[n] = bool((np.nan_to_num(gv[:, j], nan=0.0) > 0).any())
    m = ctx.series.get("grad_missing")
    if m is not None and m.steps.size:
        _, mv = ctx.before_cutoff(m)
        for j, n in enumerate(m.layers):
            out[n] = out.get(n, False) or bool((mv[:, j] == 0).any())
    return out


def _not_in_optimizer(ctx: Context) -> None:
    """Parameters that receive gradients while no optimizer group holds them: never updated."""
    held = {n: v for n, v in ctx.model.in_optimizer.items() if v is not None}
    orphans_col = model_column(ctx, "optimizer_orphans")
    orphans = 0
    if orphans_col is not None and np.isfinite(orphans_col[1]).any():
        orphans = int(np.nanmax(orphans_col[1]))
    if not held:
        if ctx.model.known:
            ctx.notes.append("not_in_optimizer: not checked, the run does not say which parameters the optimizer "
                             "holds (pass optimizer= to Diagnostics)")
        return
    got = _got_gradient(ctx)
    loose = [n for n, v in held.items() if v is False and ctx.model.requires_grad.get(n) is not False
             and got.get(n, False)]
    if not loose:
        return
    order = [n for n in ctx.model.order if n in held]
    held_names = [n for n in order if held[n]]
    loose = ctx.in_model_order(loose)
    g = ctx.series.get("grad_norm")
    steps = g.steps if g is not None and g.steps.size else np.zeros(1, dtype=np.int64)
    # The optimizer holding tensors the model no longer has, or the missing ones being the model's last
    # (its head), is a module replaced after the optimizer was built. The missing ones being the first
    # (a backbone) while the head is held is how fine-tuning freezes on purpose: info.
    head = bool(held_names) and order.index(loose[-1]) > order.index(held_names[-1])
    backbone = bool(held_names) and order.index(loose[-1]) < order.index(held_names[0])
    if orphans > 0 or head or not held_names:
        severity = "error"
    elif backbone:
        severity = "info"
    else:
        severity = "warning"
    msg = (f"Parameters never updated: {len(loose)} tensor(s) ({ctx.layer_list(loose)}) receive gradients but are in "
           "no optimizer parameter group, so optimizer.step() never changes them")
    if orphans > 0:
        msg += (f"; the optimizer holds {orphans} tensor(s) the model no longer uses (those of the module that "
                "was replaced)")
    if severity == "info":
        msg += (f"; the optimizer holds the later layers ({ctx.layer_list(held_names, 2)}), as when a backbone is "
                "frozen on purpose")
        tip = ("If they are frozen on purpose, call requires_grad_(False) on them too: the backward then skips "
               "their gradients. If they should learn, pass model.parameters() to the optimizer.")
    else:
        tip = ("Build the optimizer after replacing the module (e.g. after model.fc = nn.Linear(...)), or add "
               "them: optimizer.add_param_group({'params': model.fc.parameters()}); pass model.parameters() to the "
               "optimizer unless a part is frozen on purpose (then requires_grad_(False)).")
    ctx.add("not_in_optimizer", severity, loose, int(steps[0]), int(steps[-1]), msg + ".", tip)
    if severity != "info":
        ctx.mark_primary()


def _grad_not_reset(ctx: Context) -> None:
    """Gradients that still held the previous optimizer step's on most logged steps (no zero_grad())."""
    th = ctx.th
    col = model_column(ctx, "grad_carried")
    if col is None:
        return
    steps, v = col
    keep = steps < ctx.cutoff if ctx.cutoff is not None else np.ones(steps.shape, dtype=bool)
    steps, v = steps[keep], v[keep]
    valid = np.isfinite(v)
    span = persistent(np.where(valid, v, 0.0) >= 0.5, valid, th)
    if span is None:
        return
    carried = int((v[valid] >= 0.5).sum())
    msg = (f"Gradients never reset: on {carried} of {int(valid.sum())} logged steps the backward added to the "
           "previous optimizer step's gradients (no optimizer.zero_grad() between two optimizer steps), so each "
           "step applies the sum of all gradients so far")
    severity = "warning"
    tg = total_grad(ctx)
    if tg is not None:
        gs, gv = tg
        ok = np.isfinite(gv) & (gs >= steps[span[0]]) & (gs <= steps[span[1]])
        if ok.sum() >= 2:
            w = window(int(ok.sum()), th)
            a, b = float(np.median(gv[ok][:w])), float(np.median(gv[ok][-w:]))
            if a > 0 and b >= th.grad_reset_growth * a:
                severity = "error"
                msg += (f"; the total gradient norm grew with the step count, from {fmt(a)} to {fmt(b)} "
                        f"({fmt(b / a)}×)")
    ctx.add(
        "grad_not_reset", severity, [""], int(steps[span[0]]), int(steps[span[1]]), msg + ".",
        "Call optimizer.zero_grad() (or zero_grad(set_to_none=True)) once per optimizer step, before "
        "loss.backward(). For gradient accumulation, zero after each optimizer.step(), not before every "
        "backward.",
    )
    ctx.mark_primary()


def _module_mode(ctx: Context) -> None:
    """Mode-sensitive modules (BatchNorm, Dropout) in the wrong mode: eval while training, train while evaluating."""
    th = ctx.th
    for metric, what, fix in (
        ("eval_in_train", "in eval mode during training forwards",
         "Call model.train() before the training loop and again after each evaluation (model.eval() is never "
         "undone otherwise): in eval mode BatchNorm uses its running statistics instead of the batch's and "
         "Dropout drops nothing."),
        ("train_in_eval", "in training mode during evaluation (forwards under torch.no_grad())",
         "Call model.eval() before evaluating and model.train() after: in training mode BatchNorm normalises "
         "with the evaluation batch and updates its running statistics with it, and Dropout drops units, so "
         "the evaluation is noisy and changes the model."),
    ):
        s = ctx.series.get(metric)
        if s is None or not s.steps.size:
            continue
        steps, v = ctx.before_cutoff(s)
        if not steps.size:
            continue
        valid = np.isfinite(v)
        hits = []
        for j, n in enumerate(s.layers):
            on = (np.where(valid[:, j], v[:, j], 0.0) >= 0.5)
            if not on.any():
                continue
            # An evaluation comes every few logged steps: twice is a habit, not one odd forward.
            need = 2 if metric == "train_in_eval" else None
            if (need is not None and on.sum() >= min(need, int(valid[:, j].sum()))) or (
                    need is None and persistent(on, valid[:, j], th) is not None):
                hits.append((n, np.flatnonzero(on)))
        if not hits:
            continue
        layers = ctx.in_model_order([n for n, _ in hits])
        first = int(steps[min(int(r[0]) for _, r in hits)])
        last = int(steps[max(int(r[-1]) for _, r in hits)])
        n_on = max(int(r.size) for _, r in hits)
        types = sorted({ctx.model.module_types.get(n, "") for n in layers} - {""})
        kinds = f" ({', '.join(types)})" if types else ""
        ctx.add(
            "module_mode", "warning", layers, first, last,
            f"Module in the wrong mode: {ctx.layer_list(layers)}{kinds} ran {what} on {n_on} of {int(steps.size)} "
            f"logged steps, from step {first}.",
            fix,
        )
        ctx.mark_primary()


def _learning_rate(ctx: Context) -> None:
    """The learning rate's own course: at zero, collapsed by orders of magnitude early, or climbing without bound."""
    th = ctx.th
    s = ctx.series.get("learning_rate")
    if s is None or not s.steps.size:
        return
    steps = s.steps
    v = np.where(s.present, s.values.astype(np.float64), np.nan)
    zero_groups, collapsed, climbing = [], [], []
    for j, name in enumerate(s.layers):
        col = v[:, j]
        ok = np.isfinite(col)
        if ok.sum() < 2:
            continue
        st, c = steps[ok], col[ok]
        peak = float(c.max())
        if peak <= 0 or float(np.mean(c <= 0)) >= th.persist_fraction:
            zero_groups.append((name, st, c))
            continue
        ip = int(np.argmax(c))
        after = c[ip:]
        low = after <= th.lr_collapse_ratio * peak
        if low.any():
            i = ip + int(np.flatnonzero(low)[0])
            span_steps = max(1, int(st[-1] - st[0]))
            stays = bool((c[i:] <= th.lr_collapse_ratio * peak).all())
            if stays and (st[i] - st[0]) / span_steps <= th.lr_collapse_within and c[i:].size >= 2:
                collapsed.append((name, st, c, ip, i))
                continue
        half = c.size // 2
        if (c.size >= 4 and c[0] > 0 and peak >= th.lr_growth * c[0] and float(c[-1]) >= peak
                and c[half] > 0 and float(c[-1]) / float(c[half]) >= th.lr_growth_half):
            climbing.append((name, st, c))
    groups = len(s.layers)
    label = (lambda n: f"group '{n}'" if n else "the learning rate") if groups > 1 else (lambda n: "it")
    if zero_groups:
        names = [n for n, _, _ in zero_groups]
        st = zero_groups[0][1]
        everything = len(zero_groups) == groups
        ctx.add(
            "lr_zero", "error" if everything else "warning", names, int(st[0]), int(st[-1]),
            "Learning rate zero: " + ("it is 0 " if everything else f"{len(names)} of {groups} parameter groups "
                                      "are at 0 ")
            + "on most logged steps, so optimizer.step() changes nothing"
            + ("." if everything else " in them."),
            "Check the learning rate passed to the optimizer and the scheduler (a LambdaLR whose lambda returns 0, "
            "a warm-up that never starts, a multiplier of 0); set lr to the intended value.",
        )
        ctx.mark_primary()
    if collapsed:
        name, st, c, ip, i = min(collapsed, key=lambda t: t[1][t[4]])
        peak, end = float(c[ip]), float(c[-1])
        factor = peak / end if end > 0 else math.inf
        frozen = _loss_frozen(ctx, int(st[i]))
        severity = "error" if factor >= th.lr_collapse_error or frozen else "warning"
        by = f"10^{round(math.log10(factor))}" if math.isfinite(factor) and factor >= 1e3 else fmt(factor)
        msg = (f"Learning rate collapsed: {label(name)} fell from {fmt(peak)} at step {int(st[ip])} to "
               f"{fmt(float(c[i]))} by step {int(st[i])} (down to {fmt(end)} at the end, {by}× smaller), "
               f"{round(100 * (st[i] - st[0]) / max(1, st[-1] - st[0]))} % into the run, and never recovers")
        if frozen:
            msg += f"; the loss has barely moved since ({frozen})"
        ctx.add(
            "lr_collapsed", severity, [n for n, *_ in collapsed], int(st[ip]), int(st[-1]), msg + ".",
            "A scheduler meant per epoch (StepLR, ExponentialLR, MultiStepLR) stepped once per batch decays many "
            "times too fast: call scheduler.step() once per epoch, after the epoch's batches, or give it step "
            "counts in batches (step_size × batches per epoch).",
        )
        ctx.mark_primary()
    if climbing:
        name, st, c = climbing[0]
        start, end = float(c[0]), float(c[-1])
        severity = "error" if end >= th.lr_growth_error * start else "warning"
        ctx.add(
            "lr_unbounded", severity, [n for n, *_ in climbing], int(st[0]), int(st[-1]),
            f"Learning rate unbounded: {label(name)} climbs exponentially, from {fmt(start)} at step {int(st[0])} "
            f"to {fmt(end)} at step {int(st[-1])} ({fmt(end / start)}×), and is still rising at the end.",
            "The schedule multiplies the rate at every step (an ExponentialLR or LambdaLR with a factor above 1, "
            "a learning-rate range test left running): use a schedule that warms up to a fixed peak and then "
            "decays (linear warm-up + cosine), or cap the factor.",
        )
        ctx.mark_primary()


def _loss_frozen(ctx: Context, step: int) -> str:
    """'from 0.71 to 0.70' when the loss changed by under `loss_min_decrease` after `step`, else ''."""
    got = loss_total(ctx)
    if got is None:
        return ""
    steps, v, _ = got
    after = v[steps >= step]
    if after.size < ctx.th.min_window + 1:
        return ""
    w = window(after.size, ctx.th)
    a, b = float(np.median(after[:w])), float(np.median(after[-w:]))
    if abs(a) > 0 and abs(a - b) < ctx.th.loss_min_decrease * abs(a):
        return f"from {fmt(a)} to {fmt(b)}"
    return ""


def _output_loss_mismatch(ctx: Context) -> None:
    """Outputs already squashed: rows of probabilities (softmax) or values in [0, 1] (sigmoid), where the
    usual losses (CrossEntropyLoss, BCEWithLogitsLoss) apply their own softmax/sigmoid."""
    th = ctx.th
    lo_s, hi_s = ctx.series.get("logit_min"), ctx.series.get("logit_max")
    if lo_s is None or hi_s is None or not lo_s.steps.size or not hi_s.steps.size:
        return
    dev_s, lse_s = ctx.series.get("logit_rowsum_dev"), ctx.series.get("logit_lse")
    steps, lo = ctx.before_cutoff(lo_s)
    loss = loss_total(ctx)
    for n in lo_s.layers:
        if n not in hi_s.layers:
            continue
        hs, hi = ctx.before_cutoff(hi_s)
        common, a, b = np.intersect1d(steps, hs, return_indices=True)
        lo_c, hi_c = lo[a, lo_s.layers.index(n)], hi[b, hi_s.layers.index(n)]
        valid = np.isfinite(lo_c) & np.isfinite(hi_c)
        unit = (lo_c >= 0) & (hi_c <= 1)
        # A softmax or sigmoid output is in [0, 1] on every step: one step outside (a regression head that
        # happens to be small) rules it out.
        if not unit[valid].all() or int(valid.sum()) < th.min_window:
            continue
        rows = False
        if dev_s is not None and n in dev_s.layers:
            ds, dv = ctx.before_cutoff(dev_s)
            dcol = np.full(common.shape, np.nan)
            _, ci, di = np.intersect1d(common, ds, return_indices=True)
            dcol[ci] = dv[di, dev_s.layers.index(n)]
            rows = persistent(unit & (dcol <= th.rowsum_tolerance), valid & np.isfinite(dcol), th) is not None
        # The loss says whether it applies its own squashing: cross-entropy over probabilities p cannot go below
        # logsumexp(p) - max(p) >= logsumexp(p) - 1; a logistic loss over values in [0, 1] not below -log(sigmoid(1)).
        floor = th.sigmoid_loss_floor
        if rows and lse_s is not None and n in lse_s.layers:
            ls, lv = ctx.before_cutoff(lse_s)
            floor = float(quiet(np.nanmedian, lv[-window(ls.size, th):, lse_s.layers.index(n)])) - 1.0
        end_loss = None
        if loss is not None and loss[1].size:
            end_loss = float(np.median(loss[1][-window(loss[1].size, th):]))
        if end_loss is not None and math.isfinite(floor) and end_loss < floor * th.squash_floor_tolerance:
            continue  # the loss went below what a second softmax/sigmoid allows: it does not apply one
        hit = np.flatnonzero(unit & valid)
        first, last = int(common[hit[0]]), int(common[hit[-1]])
        where = f"outputs of '{n}' lie in [0, 1]" + (" and each row sums to 1" if rows else "")
        evidence = (f" on {hit.size} of {int(valid.sum())} logged steps (from {fmt(float(np.nanmin(lo_c)))} to "
                    f"{fmt(float(np.nanmax(hi_c)))})")
        if end_loss is not None and math.isfinite(floor):
            evidence += (f"; the loss stays at {fmt(end_loss)}, above the {fmt(floor)} that a loss applying its own "
                         f"{'softmax' if rows else 'sigmoid'} to such outputs cannot go below")
        if rows:
            msg = f"Output already a softmax: {where}{evidence}."
            tip = ("nn.CrossEntropyLoss applies log-softmax itself: return the raw logits from the model (remove the "
                   "final softmax) and apply softmax only for predictions; with probabilities, use "
                   "torch.log(p) with nn.NLLLoss, or better log_softmax + NLLLoss.")
        else:
            msg = f"Output already a sigmoid: {where}{evidence}."
            tip = ("nn.BCEWithLogitsLoss applies the sigmoid itself: return the raw logits (remove the final "
                   "sigmoid), or keep the sigmoid and use nn.BCELoss (less stable numerically).")
        # Over values in [0, 1] a logistic loss cannot go below 0.313 (label 1) and 0.693 (label 0): a loss
        # between that and the balanced-label floor fits BCELoss on a sigmoid as well, so it is only a note.
        severity = "warning" if rows or end_loss is None or end_loss >= th.sigmoid_balanced_floor else "info"
        ctx.add("output_loss_mismatch", severity, [n], first, last, msg, tip)
        if severity == "warning":
            ctx.mark_primary()


NOT_IN_OPTIMIZER = Rule("not_in_optimizer", ("not_in_optimizer",),
                        ("grad_norm", "grad_missing", "optimizer_orphans"), _not_in_optimizer,
                        after=CUTOFF, severities=("error", "warning", "info"))
GRAD_NOT_RESET = Rule("grad_not_reset", ("grad_not_reset",), ("grad_carried", "grad_norm_total", "grad_norm"),
                      _grad_not_reset, after=("nonfinite",), severities=("error", "warning"))
MODULE_MODE = Rule("module_mode", ("module_mode",), ("eval_in_train", "train_in_eval"), _module_mode,
                   after=CUTOFF, severities=("warning",))
LEARNING_RATE = Rule("learning_rate", ("lr_collapsed", "lr_unbounded", "lr_zero"), ("learning_rate", "loss"),
                     _learning_rate, after=("nonfinite",), severities=("error", "warning"))
OUTPUT_LOSS_MISMATCH = Rule("output_loss_mismatch", ("output_loss_mismatch",),
                            ("logit_min", "logit_max", "logit_rowsum_dev", "logit_lse", "loss"),
                            _output_loss_mismatch, after=CUTOFF, severities=("warning", "info"))
