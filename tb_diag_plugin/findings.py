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

from tb_diag_plugin.model_info import ModelInfo
from tb_diag_plugin.reading import Series
from tb_diag_plugin.rules_activations import _dead_relu, _saturated
from tb_diag_plugin.rules_causes import fold_symptoms
from tb_diag_plugin.rules_common import Finding, _Context
from tb_diag_plugin.rules_divergence import _loss_diverged, _weight_decay_equilibrium, _weight_norm_growth
from tb_diag_plugin.rules_generalisation import _overfitting, _underfitting
from tb_diag_plugin.rules_gradients import _exploding, _nonfinite, _vanishing
from tb_diag_plugin.rules_loss import _dominance, _loss_not_decreasing, _loss_spike
from tb_diag_plugin.rules_optimizer import _adam_eps, _gradient_clipping, _logit_growth, _no_gradient
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
    "loss_diverged",
    "overfitting",
    "underfitting",
    "no_gradient",
    "weight_norm_growth",
    "weight_decay_equilibrium",
    "gradient_clipping",
    "logit_growth",
    "adam_eps",
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
    "loss_diverged": "loss",
    "overfitting": "val_loss",
    "underfitting": "val_loss",
    "no_gradient": "grad_norm",
    "weight_norm_growth": "weight_norm",
    "weight_decay_equilibrium": "weight_norm",
    "gradient_clipping": "grad_norm_preclip",
    "logit_growth": "logit_max_abs",
    "adam_eps": "adam_eps_fraction",
}
SEVERITIES = ("error", "warning", "info")
SEVERITY_RANK = {"error": 0, "warning": 1, "info": 2}


def analyze(
    series: dict[str, Series], thresholds: Optional[Thresholds] = None, model: Optional[ModelInfo] = None
) -> tuple[list[Finding], list[str]]:
    """Run every rule over one run's series.

    `model` (`ModelInfo.from_structure(structure document)`) lets the advice
    fit the model and tells frozen parameters from broken ones; without it
    the advice is general. Returns the findings sorted worst first (error,
    warning, info; then the earliest first step), symptoms of a diagnosed
    cause folded below it, and readable notes on rules that could not run
    because a metric is missing or too short.
    """
    if model is not None and not isinstance(model, ModelInfo):
        raise TypeError(f"model must be a ModelInfo or None, got {type(model).__name__}")
    ctx = _Context(series, thresholds or Thresholds(), model=model or ModelInfo())
    for rule in _RULES:
        rule(ctx)
    fold_symptoms(ctx)
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
    _loss_diverged,
    _weight_norm_growth,
    _weight_decay_equilibrium,
    _no_gradient,  # after dead_relu: zero gradients behind dead units are its consequence
    _gradient_clipping,
    _adam_eps,
    _logit_growth,
    _overfitting,
    _underfitting,  # last: it holds only where no other rule explains a loss stuck high
)

__all__ = ["KINDS", "KIND_METRIC", "SEVERITIES", "Finding", "ModelInfo", "Thresholds", "analyze"]
