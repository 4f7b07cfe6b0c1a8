"""The registered rules, in an order that honours their declared dependencies.

Adding a rule: a `Rule` in a module of `rules/` and one line in `RULES`.
`ordered` checks every declaration against the contract (kinds, metrics) and
the other rules (names, dependencies) when the package is imported, so a
mistake fails at once rather than as a finding that never appears.
"""

from __future__ import annotations

from typing import Sequence

from tb_diag_plugin import metadata
from tb_diag_plugin.findings.context import Rule
from tb_diag_plugin.findings.rules import (
    activations,
    divergence,
    generalisation,
    gradients,
    inputs,
    loss,
    optimizer,
    spikes,
    updates,
    wiring,
)

RULES: tuple[Rule, ...] = (
    gradients.NONFINITE,
    gradients.EXPLODING,
    wiring.NOT_IN_OPTIMIZER,
    wiring.GRAD_NOT_RESET,
    wiring.MODULE_MODE,
    wiring.LEARNING_RATE,
    wiring.OUTPUT_LOSS_MISMATCH,
    spikes.GRADIENT_SPIKE,
    spikes.EARLY_GRADIENT_SPIKE,
    gradients.VANISHING,
    activations.DEAD_RELU,
    activations.SATURATED,
    updates.UPDATE_RATIO,
    loss.LOSS_SPIKE,
    loss.LOSS_NOT_DECREASING,
    loss.DOMINANCE,
    divergence.LOSS_DIVERGED,
    divergence.WEIGHT_NORM_GROWTH,
    divergence.WEIGHT_DECAY_EQUILIBRIUM,
    optimizer.NO_GRADIENT,
    optimizer.GRADIENT_CLIPPING,
    optimizer.ADAM_EPS,
    optimizer.LOGIT_GROWTH,
    generalisation.OVERFITTING,
    generalisation.UNDERFITTING,
    inputs.INPUTS_NOT_NORMALISED,
)


def ordered(rules: Sequence[Rule]) -> tuple[Rule, ...]:
    """The rules validated and sorted so that each runs after the rules it names in `after`.

    Otherwise the listed order is kept (stable). Raises ValueError for an
    unknown kind, metric or severity, a duplicate name, a dependency that is not
    registered, or a cycle.
    """
    by_name: dict[str, Rule] = {}
    for r in rules:
        if r.name in by_name:
            raise ValueError(f"rules: two rules named {r.name!r}")
        bad = [k for k in r.kinds if k not in metadata.FINDING_KINDS]
        bad += [m for m in r.metrics if m not in metadata.METRICS]
        bad += [s for s in r.severities if s not in metadata.SEVERITIES]
        bad += [k for k in r.consequence_of if k not in metadata.FINDING_KINDS]
        if bad or not r.kinds or not r.severities:
            raise ValueError(f"rule {r.name!r}: {bad or 'no kinds or severities'} not in the contract (metadata.py)")
        by_name[r.name] = r
    for r in rules:
        missing = [d for d in r.after if d not in by_name]
        if missing:
            raise ValueError(f"rule {r.name!r} runs after {missing}, which is not registered")
    out: list[Rule] = []
    done: set[str] = set()
    pending = list(rules)
    while pending:
        ready = next((r for r in pending if all(d in done for d in r.after)), None)
        if ready is None:
            raise ValueError(f"rules: dependency cycle among {[r.name for r in pending]}")
        pending.remove(ready)
        out.append(ready)
        done.add(ready.name)
    return tuple(out)


ORDER = ordered(RULES)
