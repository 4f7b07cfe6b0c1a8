"""Findings: why a training run goes wrong, from its recorded series.

Pure functions over `Series` (numpy only: TensorBoard imports this
module, so no torch). `analyze` runs every rule on what was recorded and
returns the findings, worst first, and a note for each rule that could not
run because a metric is missing. The same rules serve the tab, its HTTP
route and `tb-diag report`.

Conventions every rule follows, to keep false alarms out:

- A condition must *persist* (`Thresholds.persist_fraction` of the logged
  steps, or the last `persist_tail` of them) unless the rule is about single
  events (non-finite values, loss spikes).
- Once a run has produced NaN/Inf (loss, weights, or gradients outside an
  AMP-skipped step) the later steps describe a broken model; rules other
  than `nonfinite` only look at the steps before.
- Gradients are compared with the model's own other layers and its own
  history rather than with absolute constants alone: their scale depends on
  the loss, the batch size and the architecture.
- Biases, normalisation parameters and zero-initialised tensors are judged
  with their siblings or left out where their small size is normal.

The public surface lives here. The package imports numpy and the contract
only (no TensorBoard, no torch): `series` (what the rules read), `thresholds`
(every constant a rule uses, documented), `context` (the `Rule` declaration,
`Finding`, the shared context and helpers), `rules/` (one module per family)
`registry` (the registered rules, ordered by their declared dependencies)
and `verdicts` (what the findings say per layer, for the model view).
"""

from __future__ import annotations

from typing import Optional, Sequence

from tb_diag_plugin import metadata
from tb_diag_plugin.findings.causes import fold_symptoms
from tb_diag_plugin.findings.context import Context, Finding, Rule
from tb_diag_plugin.findings.model_info import ModelInfo
from tb_diag_plugin.findings.registry import ORDER, RULES, ordered
from tb_diag_plugin.findings.series import Series
from tb_diag_plugin.findings.thresholds import Thresholds
from tb_diag_plugin.findings.verdicts import layer_verdicts

# The kinds the registered rules report, in the contract's order.
KINDS = tuple(k for k in metadata.FINDING_KINDS if any(k in r.kinds for r in ORDER))
# The metrics the registered rules read, from their declarations: all a caller must read for `analyze`
# (the plugin reads no other metric for the findings; tests/test_rules_registry.py holds rules to it).
INPUTS: frozenset[str] = frozenset(m for r in ORDER for m in r.metrics)
SEVERITIES = metadata.SEVERITIES
SEVERITY_RANK = metadata.SEVERITY_RANK
_KIND_RANK = {k: i for i, k in enumerate(metadata.FINDING_KINDS)}


def analyze(
    series: dict[str, Series], thresholds: Optional[Thresholds] = None, rules: Optional[Sequence[Rule]] = None,
    model: Optional[ModelInfo] = None,
) -> tuple[list[Finding], list[str]]:
    """Run every registered rule (or these `rules`, ordered by dependency) over one run's series.

    `model` (`ModelInfo.from_structure(structure document)`) lets the advice
    fit the model and tells parameters frozen on purpose from broken ones;
    without it the advice is general. Returns the findings sorted worst first
    (error, warning, info; then the earliest first step), with symptoms of a
    diagnosed cause folded below it, and readable notes on rules that could
    not run because a metric is missing or too short.
    """
    if model is not None and not isinstance(model, ModelInfo):
        raise TypeError(f"model must be a ModelInfo or None, got {type(model).__name__}")
    ctx = Context(series, thresholds or Thresholds(), model=model or ModelInfo())
    run = ORDER if rules is None else ordered(rules)
    # After the last rule that reads a metric, what was computed from it is let go: held all at once,
    # the metrics of a run of thousands of tensors would not fit in memory.
    last = {m: i for i, rule in enumerate(run) for m in rule.metrics}
    try:
        for i, rule in enumerate(run):
            ctx.rule = rule
            rule.check(ctx)
            for m in rule.metrics:
                if last[m] == i:
                    ctx.release(m)
    finally:
        ctx.close()  # the files of metrics kept on disk, even when a rule failed
    ctx.rule = None
    fold_symptoms(ctx)
    # Worst first; at equal severity and step, in the contract's order of kinds (causes before symptoms).
    found = sorted(ctx.findings, key=lambda f: (SEVERITY_RANK.get(f.severity, 9), f.first_step, _KIND_RANK[f.kind]))
    return found, ctx.notes


__all__ = [
    "INPUTS", "KINDS", "RULES", "SEVERITIES", "SEVERITY_RANK", "Finding", "ModelInfo", "Rule", "Series", "Thresholds",
    "analyze", "layer_verdicts",
]
