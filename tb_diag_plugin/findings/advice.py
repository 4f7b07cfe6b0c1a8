"""Suggestions that fit the model: the findings rules' advice, chosen from `ModelInfo`.

Each function returns the `suggestion` text of one kind of finding. With an
empty `ModelInfo` (an old run without a structure document) the advice is the
general one; with a known model it leaves out what does not apply (no
"replace sigmoid/tanh" without one, no "add normalisation" to a model full of
LayerNorm) and names what does (the layers, the optimizer's own values).
"""

from __future__ import annotations

from tb_diag_plugin.findings.context import fmt, layer_list
from tb_diag_plugin.findings.model_info import GATED_TYPES, ModelInfo


def lr_of(model: ModelInfo, lr_text: str = "") -> str:
    """' (3e-3)': the recorded learning rate if any, else the optimizer's as the structure document has it."""
    if lr_text:
        return lr_text
    lrs = model.hyper("lr")
    if not lrs:
        return ""
    lo, hi = min(lrs), max(lrs)
    return f" ({fmt(lo)})" if lo == hi else f" (from {fmt(lo)} to {fmt(hi)})"


def _opt(model: ModelInfo) -> str:
    return f" of {model.optimizer}" if model.optimizer else ""


def vanishing(model: ModelInfo, lr_text: str = "") -> str:
    """Small gradients in some layers."""
    if not model.known:
        return ("Use ReLU/GELU instead of sigmoid/tanh in hidden layers, He/Xavier initialisation "
                "(weights neither tiny nor huge), normalisation (BatchNorm/LayerNorm) or residual connections; "
                "a shallower network also helps.")
    parts = []
    sat = model.saturating
    if sat:
        recurrent = any(model.module_types.get(n) in GATED_TYPES for n in sat)
        parts.append(f"Replace the sigmoid/tanh activations ({layer_list(sat, 3)}) in hidden layers with ReLU/GELU"
                     + (" (for recurrent cells: gradient clipping and a shorter unroll, or attention)"
                        if recurrent else ""))
    parts.append("use He/Xavier initialisation (weights neither tiny nor huge)")
    if not model.has_norm:
        parts.append("add normalisation (BatchNorm/LayerNorm) or residual connections")
    else:
        parts.append(f"the model already normalises ({layer_list(model.norm_layers, 2)}): small gradients "
                     f"there usually follow from over-large updates elsewhere, so check the learning "
                     f"rate{lr_of(model, lr_text)} and its warm-up first")
    text = "; ".join(parts) + "."
    return text[0].upper() + text[1:]


def exploding(model: ModelInfo, lr_text: str = "", clipping: bool = False) -> str:
    """Gradients that grow without bound or dwarf the weights (`clipping`: the run already clips)."""
    clip = ("lower the clip threshold (the run already clips, and it did not hold them)" if clipping else
            "clip gradients (torch.nn.utils.clip_grad_norm_(params, 1.0))")
    if not model.known:
        return (f"Lower the learning rate, {clip}, use a "
                "scaled initialisation (kaiming_normal_ for ReLU, xavier for tanh) and normalisation layers "
                "(BatchNorm/LayerNorm) or residual connections in deep stacks.")
    parts = [f"Lower the learning rate{lr_of(model, lr_text)}{_opt(model)}", clip]
    if model.is_transformer:
        parts.append("add a learning-rate warm-up")
    if model.relu_family:
        parts.append("initialise the ReLU layers with kaiming_normal_")
    if model.saturating:
        parts.append("initialise the sigmoid/tanh layers with xavier_uniform_")
    if not model.has_norm:
        parts.append("add normalisation layers (BatchNorm/LayerNorm) or residual connections in deep stacks")
    return "; ".join(parts) + "."


def dead_relu(model: ModelInfo, lr_text: str = "") -> str:
    """ReLU units that never fire."""
    tail = ("add normalisation before the ReLU, " if not (model.known and model.has_norm) else "")
    return (f"Dead units get no gradient and never recover: lower the learning rate{lr_of(model, lr_text)}, "
            f"check the initialisation (kaiming, biases not negative), {tail}or use LeakyReLU/GELU.")


def saturated(model: ModelInfo) -> str:
    """Sigmoid/tanh outputs in their flat tails."""
    norm = "" if (model.known and model.has_norm) else "add normalisation before the activation, "
    return ("The inputs to these activations are too large: scale the initialisation down "
            f"(xavier_uniform_), standardise the input features, {norm}or lower the learning rate; "
            "ReLU/GELU do not saturate.")


def lr_too_high(model: ModelInfo, lr_text: str, factor: str, clipping: bool = False) -> str:
    """Updates far larger than ~1e-3 of the weights (`clipping`: the run already clips)."""
    if model.known and not clipping and any(t in GATED_TYPES for t in model.module_types.values()):
        # Recurrent nets at a large SGD rate learn fine once clipped (word_language_model: lr 20, clip 0.25).
        return (f"Clip the gradient norm before optimizer.step() (torch.nn.utils.clip_grad_norm_(params, 0.25), as "
                f"recurrent nets need: their gradients spike), or lower the learning rate{lr_of(model, lr_text)} "
                f"about {factor}×.")
    extra = "warm-up and gradient clipping"
    if model.known and model.adam_family:
        extra = f"warm-up and gradient clipping ({model.optimizer} usually runs at 1e-4 to 3e-3)"
    elif model.known and model.optimizer == "SGD":
        extra = "warm-up, gradient clipping, or momentum 0.9 with a smaller step"
    return f"The learning rate{lr_of(model, lr_text)} is too high: lower it about {factor}×, or add {extra}."


def diverged(model: ModelInfo, lr_text: str, clipping: bool) -> str:
    """A loss that rose far above its start and stayed there."""
    parts = [f"Lower the learning rate{lr_of(model, lr_text)}{_opt(model)} 3 to 10× and restart from a checkpoint "
             "before the onset"]
    if clipping:
        parts.append("gradient clipping alone did not hold it: lower the clip threshold too")
    else:
        parts.append("clip gradients (torch.nn.utils.clip_grad_norm_(params, 1.0))")
    if model.is_transformer or not model.known:
        parts.append("use a learning-rate warm-up")
    if model.known and not model.has_norm:
        parts.append("normalisation layers make deep stacks more tolerant of the step size")
    return "; ".join(parts) + "."


def overfitting(model: ModelInfo, best_step: int) -> str:
    """Validation loss rising while the training loss falls."""
    parts = [f"Stop early (keep the checkpoint of step {best_step}, the best validation loss)"]
    wd = model.hyper("weight_decay")
    if model.known and model.groups:
        parts.append(f"raise weight decay (now {fmt(max(wd))})" if wd and max(wd) > 0 else "add weight decay")
    else:
        parts.append("add weight decay")
    if model.known and "Dropout" not in model.type_names:
        parts.append("add dropout")
    parts.append("get more data or augment it, or use a smaller model")
    return "; ".join(parts) + "."


def underfitting(model: ModelInfo, lr_text: str) -> str:
    """Training and validation loss both flat and high while the optimisation is healthy."""
    return ("The model fits neither set: give it more capacity (wider or deeper layers), better input features, "
            f"or tune the learning rate{lr_of(model, lr_text)} (try 3x higher and 3x lower) and train longer.")
