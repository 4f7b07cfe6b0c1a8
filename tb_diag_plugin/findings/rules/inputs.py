"""Findings rule on the model's input: `inputs_not_normalised`.

Raw features of scale ~100 (pixels in 0-255, prices, counts) into a network whose initialisation
assumes unit-scale inputs make the first layer's activations and weight gradients that many times
too large: the first updates blow up and kill units, and the symptoms (dead ReLUs, updates too
large, weights running away) are found by other rules. Only the input's recorded scale
(`input_mean`, `input_std`) says that the data is the cause."""

from __future__ import annotations

from typing import Optional

import numpy as np

from tb_diag_plugin.findings.context import CUTOFF, Context, Rule, fmt
from tb_diag_plugin.findings.model_info import NORM_TYPES
from tb_diag_plugin.findings.series import Series

# What an input ~100x too large throws up first, and what follows from that.
EXPLAINS = ("nonfinite", "exploding_gradient", "dead_relu", "saturated_activation", "update_ratio",
            "weight_norm_growth", "loss_diverged", "vanishing_gradient")


def _median(s: Optional[Series]) -> tuple[float, int]:
    """(median over the logged steps, their count) of a model-level series, (NaN, 0) when absent."""
    if s is None or not s.steps.size:
        return float("nan"), 0
    v = s.values[:, 0].astype(np.float64)
    v = v[s.present[:, 0] & np.isfinite(v)]
    return (float(np.median(v)), int(v.size)) if v.size else (float("nan"), 0)


def _and(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _inputs_not_normalised(ctx: Context) -> None:
    th = ctx.th
    std, n = _median(ctx.series.get("input_std"))
    mean, _ = _median(ctx.series.get("input_mean"))
    if n == 0:
        ctx.notes.append("inputs_not_normalised: not checked, no 'input_std' recorded (a floating-point model "
                         "input, with activations on)")
        return
    scale = max(std, abs(mean) if np.isfinite(mean) else 0.0)
    if not scale >= th.input_scale_max:
        return
    model = ctx.model
    # The first layer: the module of the first parameter in the model's order.
    param = next((n for n in model.order if n not in model.module_types and n not in model.activations
                  and "." in n), None)
    first = param.rsplit(".", 1)[0] if param is not None else None
    if first is not None and model.module_types.get(first) in NORM_TYPES:
        return  # a normalisation layer first takes the scale out
    symptoms = [f for f in ctx.findings if f.kind in EXPLAINS and f.severity != "info"]
    severity = "error" if any(f.severity == "error" for f in symptoms) else ("warning" if symptoms else "info")
    which = [k for k in EXPLAINS if any(f.kind == k for f in symptoms)]
    layer = f"'{first}'" if first else "the first layer"
    ctx.add(
        "inputs_not_normalised", severity, [first or ""], 0, int(ctx.series["input_std"].steps[-1]),
        f"Inputs not normalised: the model's input has std {fmt(std)} and mean {fmt(mean)} (median over {n} "
        f"logged steps), {fmt(scale)}× the unit scale the initialisation of {layer} assumes; that layer's "
        "activations and weight gradients grow with the input's scale"
        + (f"; the {_and(which)} finding{'s' if len(which) > 1 else ''} here follow{'' if len(which) > 1 else 's'} "
           "from it" if which else "") + ".",
        "Standardise the inputs with the training set's statistics, per feature: x = (x - mean) / std "
        "(torchvision's transforms.Normalize(mean, std) for images, sklearn's StandardScaler for tables), or "
        "put a normalisation layer (BatchNorm/LayerNorm) before the first layer.",
    )
    if symptoms:
        ctx.mark_primary()


INPUTS_NOT_NORMALISED = Rule(
    "inputs_not_normalised", ("inputs_not_normalised",), ("input_std", "input_mean"), _inputs_not_normalised,
    after=CUTOFF + ("dead_relu", "saturated_activation", "update_ratio", "weight_norm_growth", "loss_diverged",
                    "vanishing_gradient"), severities=("error", "warning", "info"),
)
