"""Findings: why a training run goes wrong, from its recorded series.

Pure functions over `reading.Series` (numpy only: TensorBoard imports this
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

The public surface lives here; the rules live in modules named for what they
judge (`rules_gradients`, `rules_activations`, `rules_updates`, `rules_loss`),
on the shared context and helpers of `rules_common`; every constant they use
is a documented field of `Thresholds` (`thresholds`).
"""

from __future__ import annotations

from typing import Callable, Optional

from tb_diag_plugin.reading import Series
from tb_diag_plugin.rules_activations import _dead_relu, _saturated
from tb_diag_plugin.rules_common import Finding, _Context
from tb_diag_plugin.rules_gradients import _exploding, _nonfinite, _vanishing
from tb_diag_plugin.rules_loss import _dominance, _loss_not_decreasing, _loss_spike
from tb_diag_plugin.rules_updates import _update_ratio
from tb_diag_plugin.thresholds import Thresholds

KINDS = (
    "nonfinite",
    "exploding_gradient",
    "vanishing_gradient",
    "dead_relu",
    "saturated_activation",
    "update_ratio",
    "loss_spike",
    "loss_not_decreasing",
    "loss_component_dominance",
)
# The metric whose chart shows each kind (for the tab's links from a finding to its heatmap).
KIND_METRIC = {
    "nonfinite": "grad_nonfinite",
    "exploding_gradient": "grad_norm",
    "vanishing_gradient": "grad_norm",
    "dead_relu": "dead_fraction",
    "saturated_activation": "saturation",
    "update_ratio": "update_ratio",
    "loss_spike": "loss",
    "loss_not_decreasing": "loss",
    "loss_component_dominance": "loss",
}
SEVERITIES = ("error", "warning", "info")
SEVERITY_RANK = {"error": 0, "warning": 1, "info": 2}


def analyze(
    series: dict[str, Series], thresholds: Optional[Thresholds] = None
) -> tuple[list[Finding], list[str]]:
    """Run every rule over one run's series.

    Returns the findings sorted worst first (error, warning, info; then the
    earliest first step) and readable notes on rules that could not run
    because a metric is missing or too short.
    """
    ctx = _Context(series, thresholds or Thresholds())
    for rule in _RULES:
        rule(ctx)
    # Worst first; at equal severity and step, causes (gradients, units) before symptoms (the loss).
    found = sorted(ctx.findings, key=lambda f: (SEVERITY_RANK.get(f.severity, 9), f.first_step, KINDS.index(f.kind)))
    return found, ctx.notes


_RULES: tuple[Callable[[_Context], None], ...] = (
    _nonfinite,  # first: sets the cutoff the other rules respect
    _exploding,
    _vanishing,
    _dead_relu,
    _saturated,
    _update_ratio,
    _loss_spike,
    _loss_not_decreasing,
    _dominance,
)

__all__ = ["KINDS", "KIND_METRIC", "SEVERITIES", "Finding", "Thresholds", "analyze"]
