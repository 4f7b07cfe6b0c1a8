"""Findings rules on training against validation loss (`val_loss`, from `diag.evaluate`):
`overfitting` and `underfitting`."""

from __future__ import annotations

from typing import Optional

import numpy as np

from tb_diag_plugin import metadata
from tb_diag_plugin.findings import advice
from tb_diag_plugin.findings.context import CUTOFF, Context, Rule, fmt, loss_total, lr_text, window

# Findings that explain a loss stuck high better than "the model is too small" does.
_OPTIMISATION_KINDS = frozenset({
    "nonfinite", "exploding_gradient", "vanishing_gradient", "dead_relu", "saturated_activation", "update_ratio",
    "loss_diverged", "no_gradient", "weight_norm_growth", "weight_decay_equilibrium", "gradient_clipping",
    "adam_eps", "loss_not_decreasing", "loss_component_dominance", "not_in_optimizer", "grad_not_reset",
    "module_mode", "lr_collapsed", "lr_unbounded", "lr_zero", "output_loss_mismatch", "gradient_spike",
})
# The rules that report them (one rule, `learning_rate`, reports the three lr_* kinds).
_OPTIMISATION_RULES = tuple(sorted({"learning_rate" if k.startswith("lr_") else k for k in _OPTIMISATION_KINDS}))


def _val_loss(ctx: Context) -> Optional[tuple[np.ndarray, np.ndarray]]:
    s = ctx.series.get("val_loss")
    if s is None or not s.steps.size:
        return None
    steps, v = ctx.before_cutoff(s)
    col = v[:, s.layers.index(metadata.TOTAL_LOSS)] if metadata.TOTAL_LOSS in s.layers else v[:, 0]
    ok = np.isfinite(col)
    return steps[ok], col[ok]


def _both_losses(ctx: Context, kind: str):
    """(validation (steps, values), training loss as `loss_total` gives it), or None after a note."""
    val = _val_loss(ctx)
    train = loss_total(ctx)
    if val is None or train is None:
        ctx.notes.append(f"{kind}: not checked, needs 'val_loss' (diag.evaluate(step, loss=val_loss)) "
                         "and the training loss")
        return None
    return val, train


def _train_at(train: tuple[np.ndarray, np.ndarray, list[str]], at: np.ndarray, th) -> np.ndarray:
    """The training loss around each of `at`'s steps: the median of the logged values up to it (a window)."""
    steps, v, _ = train
    w = max(1, window(v.size, th))
    out = np.full(at.shape, np.nan)
    for i, s in enumerate(at):
        j = int(np.searchsorted(steps, s, side="right"))
        if j > 0:
            out[i] = float(np.median(v[max(0, j - w): j]))
    return out


def _overfitting(ctx: Context) -> None:
    """Validation loss rising from its best while the training loss still falls."""
    th = ctx.th
    both = _both_losses(ctx, "overfitting")
    if both is None:
        return
    val, train = both
    vs, vv = val
    if vv.size < th.overfit_min_evals:
        return
    best = int(np.argmin(vv))
    k = max(1, min(2, vv.size - best - 1))
    if best >= vv.size - 1:
        return  # still improving at the last evaluation
    recent = float(np.median(vv[-k:]))
    if recent < vv[best] * (1 + th.overfit_rise) or recent - vv[best] <= 0:
        return
    tr = _train_at(train, vs, th)
    if not np.isfinite(tr[best]) or not np.isfinite(tr[-1]) or tr[-1] > tr[best] * (1 - th.loss_min_decrease):
        return  # the training loss rose too: divergence, not overfitting
    gap = vv - tr
    g0i = int(np.nanargmin(gap[: best + 1]))
    g0, g_end = float(gap[g0i]), float(gap[-1])
    opened = g0i
    for i in range(g0i, vs.size):
        if gap[i] >= g0 + th.overfit_gap_open * (g_end - g0):
            opened = i
            break
    severity = "warning"
    ctx.add(
        "overfitting", severity, ["val_loss", metadata.TOTAL_LOSS], int(vs[opened]), int(vs[-1]),
        f"Overfitting: the validation loss was best at step {int(vs[best])} ({fmt(float(vv[best]))}) and rose "
        f"to {fmt(recent)} while the training loss fell from {fmt(float(tr[best]))} to {fmt(float(tr[-1]))}; "
        f"the gap between them opened at step {int(vs[opened])} ({fmt(g0)} -> {fmt(g_end)}).",
        advice.overfitting(ctx.model, int(vs[best])),
    )


def _underfitting(ctx: Context) -> None:
    """Training and validation loss both flat and high while the optimisation itself looks healthy."""
    th = ctx.th
    both = _both_losses(ctx, "underfitting")
    if both is None:
        return
    val, train = both
    steps, v, _ = train
    vs, vv = val
    if v.size < th.loss_min_points or vv.size < 2:
        return
    if any(f.kind in _OPTIMISATION_KINDS and f.severity != "info" for f in ctx.findings):
        return  # a fault in the optimisation explains a loss stuck high better
    w = window(v.size, th)
    start, end = float(np.median(v[:w])), float(np.median(v[-w:]))
    half = v[v.size // 2:]
    mid = float(np.median(half[: window(half.size, th)]))
    if not start > 0 or end < th.underfit_high * start:
        return
    if mid <= 0 or (mid - end) / mid >= th.underfit_flat:
        return  # still falling: train longer
    tr = _train_at(train, vs, th)
    vend, tend = float(vv[-1]), float(tr[-1])
    if not np.isfinite(tend) or abs(vend - tend) > th.underfit_gap * max(abs(tend), 1e-12):
        return  # a gap between them is the other problem
    ctx.add(
        "underfitting", "warning", [metadata.TOTAL_LOSS, "val_loss"], int(steps[v.size // 2]), int(steps[-1]),
        f"Underfitting: the training loss is flat at {fmt(end)} ({fmt(100 * end / start)} % of its start "
        f"{fmt(start)}) over the second half of the run and the validation loss matches it ({fmt(vend)}), "
        "while gradients and update sizes look healthy.",
        advice.underfitting(ctx.model, lr_text(ctx)),
    )


OVERFITTING = Rule("overfitting", ("overfitting",), ("val_loss", "loss"), _overfitting, after=CUTOFF,
                  severities=("warning",))
# Last: it holds only where no rule on the optimisation explains a loss stuck high.
UNDERFITTING = Rule("underfitting", ("underfitting",), ("val_loss", "loss", "learning_rate"), _underfitting,
                    after=_OPTIMISATION_RULES, severities=("warning",))
