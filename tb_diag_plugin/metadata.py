"""The data contract: plugin name, summary metadata and tag naming.

Shared by the logger (which writes), the plugin and the findings (which read),
and the tab (through the `/contract` route): the one place that names the
metrics, the finding kinds, the severities and the views. Imports neither torch
nor TensorBoard (only protobuf; TensorBoard's summary proto when building
metadata), so every side can use it.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from tb_diag_plugin import plugin_data_pb2

if TYPE_CHECKING:
    from tensorboard.compat.proto import summary_pb2

PLUGIN_NAME = "diagnostics"

# Version 1: one float32 vector per metric per logged step, layer names in
# the metadata. Bump it (and upgrade old versions in `parse_plugin_data`)
# whenever the meaning of a field changes.
PROTO_VERSION = 1

VECTOR = plugin_data_pb2.DiagnosticsPluginData.VECTOR
STRUCTURE = plugin_data_pb2.DiagnosticsPluginData.STRUCTURE

# What each layer of a metric is: a parameter tensor ("0.weight"), the whole model (""
# or a parameter group), an activation site, a loss component (TOTAL_LOSS for `loss=`) or
# evaluation metric by name, or a module (the model's output head).
LAYER_KINDS = ("param", "model", "site", "loss", "module")
# The loss layer that holds `Diagnostics.step(loss=...)` (and `evaluate(loss=...)`); other loss
# layers are the user's named components.
TOTAL_LOSS = "total"

# What an activation site is, for what it records: "relu" (dead units), "sigmoid" and "tanh"
# (saturation), "other" (mean and std only).
ACTIVATION_KINDS = ("relu", "sigmoid", "tanh", "other")
DEAD_UNIT_KINDS = ("relu",)  # the kinds that record dead_fraction
SATURATING_KINDS = ("sigmoid", "tanh")  # the kinds that record saturation
# An activation site's name: the activation module's own qualified name ("enc.act"), or the
# n-th call of a function inside a module's forward: "enc.relu()", "enc.relu()#2" ("relu()" at
# the root). One pattern, read by Python and the tab (JavaScript) alike: group 1 is the module.
SITE_NAME_PATTERN = r"^(?:(.*)\.)?[A-Za-z_][A-Za-z0-9_]*\(\)(?:#\d+)?$"
# The most layer rows a heatmap of the tab shows (it asks for fewer on a short window): the server warms the
# group rows of every level of the module tree up to this many rows, so that a first visit finds them.
HEATMAP_MAX_ROWS = 200
_SITE_NAME = re.compile(SITE_NAME_PATTERN)
# The tab's views, in tab order; a metric's `view` is the one whose chart offers it
# ("layer": only in a layer's drill-down).
VIEWS = ("overview", "gradients", "activations", "loss", "model", "layer")
# How values are drawn: log axis, linear axis, or a share in [0, 1].
SCALES = ("log", "linear", "unit")


@dataclass(frozen=True)
class MetricSpec:
    """One metric: its name (in tags), what its layers are, its unit, how and where it is drawn."""

    name: str
    layer_kind: str  # one of LAYER_KINDS
    label: str
    unit: str  # "" for a plain number
    scale: str  # one of SCALES
    view: str  # one of VIEWS
    missing: str = ""  # why a run may lack it, for the tab
    needs: tuple[str, ...] = ()  # derived in the tab from these recorded metrics; () when recorded
    signed: bool = False  # values may be negative (a diverging colour scale)

    def to_dict(self) -> dict:
        """JSON-safe dict for the tab (the `/contract` route)."""
        return {
            "name": self.name, "layer_kind": self.layer_kind, "label": self.label, "unit": self.unit,
            "scale": self.scale, "view": self.view, "missing": self.missing, "needs": list(self.needs),
            "signed": self.signed,
        }


_PER_SAMPLE = "per-sample loss spread (pass losses={'ce': per_sample_ce} with one value per sample)"
# Every metric, in the order the tab lists them.
METRIC_SPECS = (
    MetricSpec("grad_norm", "param", "Gradient L2 norm", "", "log", "gradients"),
    MetricSpec("grad_max_abs", "param", "Gradient max |g|", "", "log", "gradients"),
    MetricSpec("grad_nonfinite", "param", "Non-finite gradient elements", "elements", "linear", "layer"),
    MetricSpec("weight_norm", "param", "Weight L2 norm", "", "log", "gradients"),
    MetricSpec("update_ratio", "param", "Update ratio \u2016\u0394w\u2016/\u2016w\u2016", "", "log", "gradients",
               missing="no update_ratio recorded (pass optimizer= to Diagnostics)"),
    MetricSpec("grad_to_weight", "param", "Gradient-to-weight ratio \u2016g\u2016/\u2016w\u2016", "", "log",
               "gradients", needs=("grad_norm", "weight_norm")),
    MetricSpec("grad_missing", "param", "Gradient missing (.grad is None)", "", "unit", "layer"),
    MetricSpec("adam_eps_fraction", "param", "Share of entries with \u221av\u0302 < eps", "", "unit", "layer",
               missing="no adam_eps_fraction recorded (Adam-family optimizers only)"),
    MetricSpec("update_rms", "param", "Adam update RMS m\u0302/(\u221av\u0302+eps)", "", "log", "layer",
               missing="no update_rms recorded (Adam-family optimizers only)"),
    MetricSpec("dead_fraction", "site", "Dead-unit fraction", "", "unit", "activations",
               missing="no dead_fraction recorded (no ReLU-family activations were seen)"),
    MetricSpec("saturation", "site", "Saturated fraction", "", "unit", "activations",
               missing="no saturation recorded (no sigmoid/tanh activations were seen)"),
    MetricSpec("act_mean", "site", "Activation mean", "", "linear", "activations", signed=True),
    MetricSpec("act_std", "site", "Activation std", "", "log", "activations"),
    MetricSpec("logit_max_abs", "module", "Logit max |z|", "", "log", "layer"),
    MetricSpec("logit_lse", "module", "Logit log-sum-exp (mean)", "nats", "linear", "layer", signed=True),
    MetricSpec("logit_min", "module", "Logit minimum", "", "linear", "layer", signed=True),
    MetricSpec("logit_max", "module", "Logit maximum", "", "linear", "layer", signed=True),
    # max over rows of |sum over the last dim - 1|: ~0 when each row already is a probability distribution
    MetricSpec("logit_rowsum_dev", "module", "Output row sum, largest |sum - 1|", "", "linear", "layer"),
    # Mode-sensitive modules (BatchNorm, Dropout, ...): 1 when in eval mode in a grad-enabled forward of
    # the logged step / in training mode in a no_grad forward since the previous logged step.
    MetricSpec("eval_in_train", "module", "Module in eval mode while training", "", "unit", "layer"),
    MetricSpec("train_in_eval", "module", "Module in training mode while evaluating", "", "unit", "layer"),
    MetricSpec("grad_norm_total", "model", "Total gradient norm", "", "log", "overview"),
    MetricSpec("grad_norm_preclip", "model", "Total gradient norm before clipping", "", "log", "overview"),
    MetricSpec("learning_rate", "model", "Learning rate", "", "log", "overview"),
    # Between logged steps (NaN when not measured): the largest global gradient norm since the
    # previous logged step; the first step whose loss or global gradient norm was not finite.
    MetricSpec("grad_norm_max_between", "model", "Largest total gradient norm since the last logged step", "",
               "log", "layer"),
    MetricSpec("nonfinite_first_step", "model", "First non-finite step since the last logged step", "step",
               "linear", "layer"),
    # 1 when the logged step's backward accumulated into the previous optimizer step's gradients
    # (no zero_grad() between two optimizer steps), 0 when they had been reset, NaN when unknown.
    MetricSpec("grad_carried", "model", "Gradients carried over from the previous step", "", "unit", "layer"),
    MetricSpec("optimizer_orphans", "model", "Optimizer tensors not in the model", "tensors", "linear", "layer"),
    MetricSpec("amp_scale", "model", "AMP loss scale", "", "log", "layer"),
    MetricSpec("amp_skipped", "model", "AMP skipped steps", "", "linear", "layer"),
    MetricSpec("loss", "loss", "Loss", "", "linear", "loss", signed=True),
    MetricSpec("loss_min", "loss", "Loss, per-sample minimum", "", "linear", "loss", _PER_SAMPLE, signed=True),
    MetricSpec("loss_p05", "loss", "Loss, per-sample 5th percentile", "", "linear", "loss", _PER_SAMPLE, signed=True),
    MetricSpec("loss_p25", "loss", "Loss, per-sample 25th percentile", "", "linear", "loss", _PER_SAMPLE, signed=True),
    MetricSpec("loss_p50", "loss", "Loss, per-sample median", "", "linear", "loss", _PER_SAMPLE, signed=True),
    MetricSpec("loss_p75", "loss", "Loss, per-sample 75th percentile", "", "linear", "loss", _PER_SAMPLE, signed=True),
    MetricSpec("loss_p95", "loss", "Loss, per-sample 95th percentile", "", "linear", "loss", _PER_SAMPLE, signed=True),
    MetricSpec("loss_max", "loss", "Loss, per-sample maximum", "", "linear", "loss", _PER_SAMPLE, signed=True),
    # The total loss passed to diag.step() since the previous logged step: largest and smallest.
    MetricSpec("loss_max_between", "loss", "Loss, largest since the last logged step", "", "linear", "layer",
               signed=True),
    MetricSpec("loss_min_between", "loss", "Loss, smallest since the last logged step", "", "linear", "layer",
               signed=True),
    MetricSpec("val_loss", "loss", "Validation loss", "", "linear", "loss", signed=True,
               missing="no val_loss recorded (call diag.evaluate(step, loss=...))"),
    MetricSpec("val_metric", "loss", "Validation metric", "", "linear", "loss", signed=True,
               missing="no val_metric recorded (call diag.evaluate(step, metrics={...}))"),
    # Issue 23, the one record of a stop: written once, at the step `stop_on=` stopped training; the value is
    # the severity rank (SEVERITY_RANK) that `stop_on` named. The findings that reached it say why.
    MetricSpec("stopped", "model", "Training stopped by tb-diag (stop_on)", "", "linear", "layer",
               missing="training was not stopped by tb-diag (Diagnostics(..., stop_on='error'))"),
    # Issue 22, the model input's scale on logged training forwards (inputs not normalised).
    MetricSpec("input_mean", "model", "Model input mean", "", "linear", "layer", signed=True,
               missing="no floating-point model input recorded (token ids, or activations=False)"),
    MetricSpec("input_std", "model", "Model input std", "", "log", "layer",
               missing="no floating-point model input recorded (token ids, or activations=False)"),
)
METRICS = {m.name: m for m in METRIC_SPECS}


def _names(layer_kind: str, recorded: bool = True) -> tuple[str, ...]:
    return tuple(m.name for m in METRIC_SPECS if m.layer_kind == layer_kind and not (recorded and m.needs))


# Recorded metric names by what their layers are:
PARAM_METRICS = _names("param")
MODEL_METRICS = _names("model")
ACTIVATION_METRICS = _names("site")
MODULE_METRICS = _names("module")
LOSS_SPREAD_METRICS = tuple(m.name for m in METRIC_SPECS if m.missing == _PER_SAMPLE)
LOSS_METRICS = _names("loss")
ALL_METRICS = tuple(m.name for m in METRIC_SPECS if not m.needs)
# The overview's charts, read first (the read-ahead, the overview's table).
OVERVIEW_METRICS = ("loss", "grad_norm_total", "learning_rate", "dead_fraction")

# Findings: severities worst first, and every kind a rule may report. At equal severity
# and first step, findings sort in this order: causes (gradients, units) before symptoms
# (the loss).
SEVERITIES = ("error", "warning", "info")
SEVERITY_RANK = {s: i for i, s in enumerate(SEVERITIES)}
FINDING_KINDS = (
    # Wiring of the training loop: causes that explain the symptoms below.
    "not_in_optimizer",
    "grad_not_reset",
    "module_mode",
    "lr_collapsed",
    "lr_unbounded",
    "lr_zero",
    "output_loss_mismatch",
    "nonfinite",
    "exploding_gradient",
    "gradient_spike",
    "vanishing_gradient",
    "no_gradient",
    "gradient_clipping",
    "dead_relu",
    "saturated_activation",
    "logit_growth",
    "update_ratio",
    "adam_eps",
    "weight_norm_growth",
    "weight_decay_equilibrium",
    "loss_spike",
    "loss_diverged",
    "loss_not_decreasing",
    "loss_component_dominance",
    "overfitting",
    "underfitting",
    "inputs_not_normalised",
)
# The view and metric a finding of each kind opens (metric None: the view's default).
FINDING_VIEW = {
    "not_in_optimizer": ("gradients", "update_ratio"),
    "grad_not_reset": ("overview", "grad_norm_total"),
    "module_mode": ("layer", "eval_in_train"),
    "lr_collapsed": ("overview", "learning_rate"),
    "lr_unbounded": ("overview", "learning_rate"),
    "lr_zero": ("overview", "learning_rate"),
    "output_loss_mismatch": ("layer", "logit_rowsum_dev"),
    "nonfinite": ("gradients", "grad_norm"),
    "exploding_gradient": ("gradients", "grad_norm"),
    "gradient_spike": ("overview", "grad_norm_total"),
    "vanishing_gradient": ("gradients", "grad_norm"),
    "no_gradient": ("gradients", "grad_norm"),
    "gradient_clipping": ("overview", "grad_norm_preclip"),
    "dead_relu": ("activations", "dead_fraction"),
    "saturated_activation": ("activations", "saturation"),
    "logit_growth": ("layer", "logit_max_abs"),
    "update_ratio": ("gradients", "update_ratio"),
    "adam_eps": ("layer", "adam_eps_fraction"),
    "weight_norm_growth": ("gradients", "weight_norm"),
    "weight_decay_equilibrium": ("gradients", "weight_norm"),
    "loss_spike": ("loss", None),
    "loss_diverged": ("loss", None),
    "loss_not_decreasing": ("loss", None),
    "loss_component_dominance": ("loss", None),
    "overfitting": ("loss", None),
    "underfitting": ("loss", None),
    "inputs_not_normalised": ("layer", "input_std"),
}


def site_name(module: str, function: str, n: int) -> str:
    """The name of the `n`-th call (1, 2, ...) of activation `function` in a forward of `module`;
    n = 0: the activation module `module` itself."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    if n == 0:
        return module
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", function):
        raise ValueError(f"function must be a Python name, got {function!r}")
    base = f"{module}.{function}()" if module else f"{function}()"
    return base if n == 1 else f"{base}#{n}"


def site_module(name: str) -> str:
    """The module an activation site belongs to: `site_name`'s `module` (an activation module: itself)."""
    m = _SITE_NAME.fullmatch(name)
    return (m.group(1) or "") if m else name


def contract_dict() -> dict:
    """The names the tab needs, JSON-safe: metrics, views, severities, finding kinds and their links,
    the loss's total layer, the activation kinds, the structure document's version, the site-name pattern and
    the most rows a heatmap shows."""
    return {
        "version": PROTO_VERSION,
        "total_loss": TOTAL_LOSS,
        "activation_kinds": list(ACTIVATION_KINDS),
        "dead_unit_kinds": list(DEAD_UNIT_KINDS),
        "saturating_kinds": list(SATURATING_KINDS),
        "structure_version": STRUCTURE_VERSION,
        "site_name_pattern": SITE_NAME_PATTERN,
        "heatmap_max_rows": HEATMAP_MAX_ROWS,
        "metrics": [m.to_dict() for m in METRIC_SPECS],
        "layer_kinds": list(LAYER_KINDS),
        "views": list(VIEWS),
        "overview_metrics": list(OVERVIEW_METRICS),
        "loss_spread_metrics": list(LOSS_SPREAD_METRICS),
        "severities": list(SEVERITIES),
        "finding_kinds": list(FINDING_KINDS),
        "finding_view": {k: {"view": v, "metric": m} for k, (v, m) in FINDING_VIEW.items()},
    }


# Names the logger's modules unpack in a fixed order (each is a METRICS entry above):
# `Diagnostics.step(grad_norm=)`, the global norm before clipping (`grad_norm_total` is after);
GRAD_NORM_PRECLIP = METRICS["grad_norm_preclip"].name
# per parameter, the optimizer's view; the output head; `Diagnostics.evaluate()`.
PARAM_OPTIMIZER_METRICS = tuple(METRICS[n].name for n in ("grad_missing", "adam_eps_fraction", "update_rms"))
LOGIT_METRICS = tuple(METRICS[n].name for n in ("logit_max_abs", "logit_lse"))
# The head's output range and whether its rows already sum to 1 (issue 22).
LOGIT_RANGE_METRICS = tuple(METRICS[n].name for n in ("logit_min", "logit_max", "logit_rowsum_dev"))
INPUT_METRICS = tuple(METRICS[n].name for n in ("input_mean", "input_std"))
VALIDATION_METRICS = tuple(METRICS[n].name for n in ("val_loss", "val_metric"))

STOPPED = METRICS["stopped"].name

STRUCTURE_TAG = PLUGIN_NAME + "/_structure"
# The structure document's version ("version" in it): bump it, and upgrade older documents in
# `check_structure`, whenever the meaning of a key changes.
STRUCTURE_VERSION = 1


class ContractError(ValueError):
    """Plugin metadata that this version cannot interpret."""


@dataclass(frozen=True)
class PluginData:
    """Parsed, version-upgraded contents of one tag's plugin metadata."""

    metric: str
    layers: tuple[str, ...]
    layer_types: tuple[str, ...] = field(default=())
    kind: int = VECTOR
    version: int = PROTO_VERSION


def vector_tag(metric: str, layers: Sequence[str]) -> str:
    """Tag for `metric` over exactly these layers.

    The layer list is hashed into the tag so that a different set of layers
    (a new activation site, another loss component, a restarted job with a
    different model) gets a tag of its own instead of clashing with the
    metadata TensorBoard kept from the first summary of the old tag.
    """
    hit = _TAGS.get(metric)
    if hit is not None and hit[0] == layers:  # the names decide: a list rebuilt or changed in place is compared
        return hit[1]
    digest = hashlib.sha1("\n".join(layers).encode("utf-8")).hexdigest()[:10]
    tag = f"{PLUGIN_NAME}/{metric}/{digest}"
    _TAGS[metric] = (list(layers) if isinstance(layers, list) else tuple(layers), tag)
    return tag


# metric -> (a copy of the last layer names asked for, their tag): a logged step asks again for the tags it
# wrote last time, and comparing thousands of names with their copy costs a few microseconds where hashing
# them costs a hundred or more. One entry per metric, so nothing grows with the steps.
_TAGS: dict[str, tuple[Sequence[str], str]] = {}


def check_structure(doc: Any) -> dict[str, Any]:
    """The structure document (the module tree the logger writes once per run), checked; ContractError
    for a version this reader does not know or a shape it cannot use.

    ``{"version": 1, "modules": [{"name", "type", "num_params", "params": [{"name", "shape", "numel",
    "tracked", "requires_grad", "in_optimizer"}], "sites": [{"name", "type", "kind"}]}],
    "optimizer": {"class", "groups": [...]} or null}``; keys a version-1 logger added later
    (`requires_grad`, `in_optimizer`, `optimizer`) may be absent.
    """
    if not isinstance(doc, dict):
        raise ContractError(f"structure document is not an object ({type(doc).__name__})")
    version = doc.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ContractError(f"structure document has no valid version ({version!r})")
    if version > STRUCTURE_VERSION:
        raise ContractError(
            f"structure document written by a newer tb-diag (version {version}, this reader knows "
            f"{STRUCTURE_VERSION}): upgrade tb-diag"
        )
    modules = doc.get("modules")
    if not isinstance(modules, list):
        raise ContractError("structure document has no module list")
    for i, m in enumerate(modules):
        where = f"structure document module {i}"
        if not isinstance(m, dict) or not isinstance(m.get("name"), str) or not isinstance(m.get("type"), str):
            raise ContractError(f"{where} has no name and type")
        for key in ("params", "sites"):
            if not isinstance(m.get(key, []), list) or not all(isinstance(x, dict) and isinstance(x.get("name"), str)
                                                               for x in m.get(key, [])):
                raise ContractError(f"{where} ({m['name']!r}): {key} is not a list of named objects")
        for site in m.get("sites", []):
            if site.get("kind") not in ACTIVATION_KINDS:
                raise ContractError(f"{where} ({m['name']!r}): activation site {site['name']!r} has unknown "
                                    f"kind {site.get('kind')!r}")
    if not isinstance(doc.get("optimizer"), (dict, type(None))):
        raise ContractError("structure document's optimizer is neither an object nor null")
    return doc


def parse_structure(blob: bytes) -> dict[str, Any]:
    """The structure document from its summary's bytes (UTF-8 JSON), checked by `check_structure`."""
    try:
        doc = json.loads(bytes(blob).decode("utf-8"))
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, or nested past Python's stack
        raise ContractError(f"structure document is not JSON ({type(e).__name__}: {e})") from None
    return check_structure(doc)


def create_summary_metadata(
    metric: str,
    layers: Sequence[str],
    layer_types: Sequence[str] = (),
    kind: int = VECTOR,
) -> summary_pb2.SummaryMetadata:
    """SummaryMetadata for one tag, carrying the metric and its layer names."""
    # Here, not at the top: the findings import this contract where TensorBoard may be absent.
    from tensorboard.compat.proto import summary_pb2

    if layer_types and len(layer_types) != len(layers):
        raise ValueError("layer_types must be empty or as long as layers")
    content = plugin_data_pb2.DiagnosticsPluginData(
        version=PROTO_VERSION,
        metric=metric,
        layers=list(layers),
        layer_types=list(layer_types),
        kind=kind,
    )
    data_class = (
        summary_pb2.DATA_CLASS_BLOB_SEQUENCE if kind == STRUCTURE else summary_pb2.DATA_CLASS_TENSOR
    )
    return summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(
            plugin_name=PLUGIN_NAME, content=content.SerializeToString()
        ),
        data_class=data_class,
    )


def parse_plugin_data(content: bytes) -> PluginData:
    """Parse `plugin_data.content`; raise ContractError for what we cannot read.

    Version 0 (no version field) never existed in released files and is
    rejected; versions newer than ours are rejected with a message that says
    to upgrade, rather than guessed at.
    """
    if not isinstance(content, (bytes, bytearray)):
        raise ContractError("plugin content is not bytes")
    proto = plugin_data_pb2.DiagnosticsPluginData()
    try:
        proto.ParseFromString(bytes(content))
    except Exception as e:  # protobuf raises DecodeError, sometimes others
        raise ContractError(f"undecodable plugin metadata: {e}") from None
    if proto.version < 1:
        raise ContractError("plugin metadata has no contract version")
    if proto.version > PROTO_VERSION:
        raise ContractError(
            f"written by a newer tb-diag (contract v{proto.version}, this reader knows "
            f"v{PROTO_VERSION}): upgrade tb-diag"
        )
    if not proto.metric:
        raise ContractError("plugin metadata names no metric")
    layer_types = tuple(proto.layer_types)
    if layer_types and len(layer_types) != len(proto.layers):
        raise ContractError("layer_types and layers differ in length")
    return PluginData(
        metric=proto.metric,
        layers=tuple(proto.layers),
        layer_types=layer_types,
        kind=proto.kind,
        version=proto.version,
    )
