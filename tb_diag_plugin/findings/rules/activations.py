"""Findings rules on activation sites: `dead_relu` and `saturated_activation`."""

from __future__ import annotations

import numpy as np

from tb_diag_plugin.findings import advice
from tb_diag_plugin.findings.context import (
    CAUSE_KINDS,
    CUTOFF,
    Context,
    Rule,
    finite,
    loss_total,
    lr_text,
    pct,
    persistent,
    quiet,
    window,
)
from tb_diag_plugin.findings.thresholds import Thresholds


def _dead_relu(ctx: Context) -> None:
    th = ctx.th
    got = ctx.get("dead_relu", "dead_fraction", why="no ReLU-family activation sites, or activations=False")
    if got is None:
        return
    (d,) = got
    steps, dv = ctx.before_cutoff(d)
    if steps.size == 0:
        return
    valid = finite(dv)
    hits = []
    for j, n in enumerate(d.layers):
        span = persistent(dv[:, j] >= th.dead_fraction, valid[:, j], th)
        if span is not None:
            hits.append((n, span, float(quiet(np.nanmedian, dv[span[0]: span[1] + 1, j]))))
    if not hits:
        return
    layers = [h[0] for h in hits]
    first = min(h[1][0] for h in hits)
    last = max(h[1][1] for h in hits)
    worst = max(h[2] for h in hits)
    severity = "error" if worst >= th.dead_error_fraction else "warning"
    shares = ", ".join(f"'{n}' {pct(f)}" for n, _, f in hits[:6])
    ctx.add(
        "dead_relu", severity, layers, int(steps[first]), int(steps[last]),
        f"Dead ReLUs: units never positive on a logged batch since step {int(steps[first])}: {shares}"
        + (f" and {len(hits) - 6} more" if len(hits) > 6 else "") + ".",
        advice.dead_relu(ctx.model, lr_text(ctx)),
    )
    ctx.mark_primary()  # dead units starve the weights they feed (adam_eps, a stalled loss)


def _saturated(ctx: Context) -> None:
    th = ctx.th
    got = ctx.get("saturated_activation", "saturation", why="no sigmoid/tanh activation sites")
    if got is None:
        return
    (s,) = got
    steps, sv = ctx.before_cutoff(s)
    if steps.size == 0:
        return
    valid = finite(sv)
    w = window(steps.size, th)
    loss = loss_total(ctx)
    warn, confident = [], []
    for j, n in enumerate(s.layers):
        high = sv[:, j] >= th.saturation_fraction
        span = persistent(high, valid[:, j], th)
        if span is None:
            continue
        share = float(quiet(np.nanmedian, sv[span[0]: span[1] + 1, j]))
        from_start = bool(quiet(np.nanmedian, sv[:w, j]) >= th.saturation_fraction)
        entry = (n, span, share, from_start)
        if not from_start and loss is not None and _improved_after(loss, int(steps[span[0]]), th):
            confident.append(entry)
        else:
            warn.append(entry)
    for group, severity in ((warn, "warning"), (confident, "info")):
        if not group:
            continue
        layers = [e[0] for e in group]
        first = int(steps[min(e[1][0] for e in group)])
        last = int(steps[max(e[1][1] for e in group)])
        shares = ", ".join(f"'{n}' {pct(f)}" for n, _, f, _ in group[:6])
        if severity == "warning":
            since = "from the first logged steps" if any(e[3] for e in group) else f"since step {first}"
            ctx.add(
                "saturated_activation", severity, layers, first, last,
                f"Saturated activations: sigmoid/tanh outputs in their flat tails (gradient under 5 % of its peak) "
                f"{since}: "
                f"{shares}.",
                advice.saturated(ctx.model),
            )
        else:
            ctx.add(
                "saturated_activation", severity, layers, first, last,
                f"Confident outputs: {shares} saturate from step {first} while the loss keeps falling.",
                "Expected for an output sigmoid trained with BCE. For a hidden layer, check that the "
                "gradients below it do not vanish.",
            )


def _improved_after(loss: tuple[np.ndarray, np.ndarray, list[str]], step: int, th: Thresholds) -> bool:
    """Whether the loss fell by `saturation_improved` of its value at `step` by the end."""
    steps, v, _ = loss
    after = v[steps >= step]
    before = v[steps <= step]
    if after.size < 2 or before.size < 1:
        return False
    w = window(after.size, th)
    at = float(np.median(before[-w:]))
    end = float(np.median(after[-w:]))
    return at > 0 and end <= at * (1 - th.saturation_improved)


DEAD_RELU = Rule("dead_relu", ("dead_relu",), ("dead_fraction", "learning_rate"), _dead_relu, after=CUTOFF,
                 severities=("error", "warning"),
                 consequence_of=("weight_decay_equilibrium", "lr_unbounded", "grad_not_reset"))
SATURATED = Rule("saturated_activation", ("saturated_activation",), ("saturation", "loss"), _saturated, after=CUTOFF,
                 severities=("warning", "info"), consequence_of=CAUSE_KINDS)
