"""Causes before consequences: once a rule has diagnosed a cause (a wiring fault, divergence,
NaN, exploding gradients, an unclipped early blow-up, over-large updates, ...), the findings
that follow from it drop to `info` and say which cause they follow from, so that the first line
a user reads is the cause.

Which finding can follow from which is declared by each rule (`Rule.consequence_of`); this
module only applies those declarations."""

from __future__ import annotations

import dataclasses
from typing import Optional

from tb_diag_plugin import metadata
from tb_diag_plugin.findings.context import Context, Finding

_KIND_RANK = {k: i for i, k in enumerate(metadata.FINDING_KINDS)}


def headline(f: Finding) -> str:
    """The problem in plain words: a message's text before its first colon ('Vanishing gradients')."""
    head = f.message.split(":", 1)[0]
    return head if len(head) < 60 else f.kind.replace("_", " ")


def fold_symptoms(ctx: Context) -> None:
    """Lower to info each finding whose rule declares a cause that was found (and began no later).

    Causes are the findings a rule marked primary and that are not themselves lowered; findings
    are decided in the contract's order of kinds (wiring causes first), so a chain (a head in
    no optimizer -> exploding gradients -> a vanishing LayerNorm gradient) folds onto its root.
    """
    causes = {i for i in set(ctx.primary) if ctx.findings[i].severity != "info"}
    for i in sorted(range(len(ctx.findings)), key=lambda i: (_KIND_RANK[ctx.findings[i].kind], i)):
        f = ctx.findings[i]
        rule = ctx.rule_of[i] if i < len(ctx.rule_of) else None
        if f.severity == "info" or rule is None or not rule.consequence_of:
            continue
        cause = _earliest_before([ctx.findings[j] for j in causes if j != i], f, rule.consequence_of)
        if cause is None:
            continue
        causes.discard(i)
        # The run is as bad as its worst symptom: a cause never reads milder than what it explains (a
        # schedule at warning whose run has turned NaN is an error).
        j = next(j for j in causes if ctx.findings[j] is cause)
        if metadata.SEVERITY_RANK[f.severity] < metadata.SEVERITY_RANK[cause.severity]:
            ctx.findings[j] = cause = dataclasses.replace(cause, severity=f.severity)
        ctx.findings[i] = Finding(
            f.kind, "info", f.layers, f.first_step, f.last_step,
            f"{f.message} Probably a consequence of {_lower(headline(cause))} (the {cause.kind} finding, "
            f"from step {cause.first_step}).",
            f"Fix the {cause.kind} finding first. " + f.suggestion, f.steps,
        )


def _lower(text: str) -> str:
    """'Loss diverged' -> 'loss diverged' inside a sentence; names ('NaN/Inf', "Adam's eps") stay."""
    return text if text[1:2].isupper() or text.split(" ")[0] in ("NaN/Inf", "Adam's") else text[:1].lower() + text[1:]


def _earliest_before(causes: list[Finding], f: Finding, kinds: tuple[str, ...]) -> Optional[Finding]:
    """The earliest cause of one of `kinds` that began no later than `f` did (or in the first tenth of
    its span), or None.

    The slack: a symptom judged over the whole run starts at the first logged step, while a cause
    that rules leave Adam's first step out of shows from the second.
    """
    slack = (f.last_step - f.first_step) // 10
    before = [c for c in causes if c.kind in kinds and c.kind != f.kind and c.first_step <= f.first_step + slack]
    return min(before, key=lambda c: (c.first_step, _KIND_RANK[c.kind])) if before else None
