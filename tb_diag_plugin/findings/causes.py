"""Causes before symptoms: once a rule has diagnosed a cause (divergence, NaN, exploding
gradients, over-large updates, ...), the symptoms that start with or after it drop to `info`
and say what they follow from, so that the first line a user reads is the cause."""

from __future__ import annotations

from tb_diag_plugin.findings.context import Finding, _Context

# Kinds that a diverging or blown-up run shows as a consequence (small LayerNorm-gain gradients
# next to a blown-up embedding, a loss that does not decrease because it diverged, ...).
SYMPTOM_KINDS = frozenset({
    "vanishing_gradient", "loss_not_decreasing", "loss_spike", "saturated_activation", "logit_growth",
})
# Causes that also explain findings which are otherwise causes themselves: weights pinned near 0 by the
# decay make every step large next to them (update_ratio) and the units dead.
ABSORBS = {
    "weight_decay_equilibrium": SYMPTOM_KINDS | {"update_ratio", "adam_eps", "dead_relu"},
}


def fold_symptoms(ctx: _Context) -> None:
    """Demote symptom findings that start at or after a primary finding's first step to info."""
    causes = [ctx.findings[i] for i in sorted(set(ctx.primary)) if ctx.findings[i].severity != "info"]
    if not causes:
        return
    for i, f in enumerate(ctx.findings):
        if f.severity == "info":
            continue
        strong = [c for c in causes if c.kind != f.kind and f.kind in ABSORBS.get(c.kind, ())]
        if strong:
            cause = min(strong, key=lambda c: c.first_step)
        elif f.kind in SYMPTOM_KINDS and i not in ctx.primary:
            cause = _earliest_before(causes, f)
        else:
            continue
        if cause is None:
            continue
        ctx.findings[i] = Finding(
            f.kind, "info", f.layers, f.first_step, f.last_step,
            f"Probably a consequence of {cause.kind} (from step {cause.first_step}): {f.message}",
            f"Fix the {cause.kind} finding first. " + f.suggestion, f.steps,
        )


def _earliest_before(causes: list[Finding], f: Finding):
    """The earliest cause that began no later than `f` did (or in the first tenth of its span), or None.

    The slack: a symptom judged over the whole run starts at the first logged step, while a cause
    that rules leave Adam's first step out of shows from the second.
    """
    slack = (f.last_step - f.first_step) // 10
    before = [c for c in causes if c.first_step <= f.first_step + slack]
    return min(before, key=lambda c: c.first_step) if before else None
