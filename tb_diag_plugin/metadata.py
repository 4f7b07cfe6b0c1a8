"""The data contract: plugin name, summary metadata and tag naming.

Shared by the logger (which writes) and the plugin (which reads). Imports
neither torch nor TensorBoard's server code, so both sides can use it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Sequence

from tensorboard.compat.proto import summary_pb2

from tb_diag_plugin import plugin_data_pb2

PLUGIN_NAME = "diagnostics"

# Version 1: one float32 vector per metric per logged step, layer names in
# the metadata. Bump it (and upgrade old versions in `parse_plugin_data`)
# whenever the meaning of a field changes.
PROTO_VERSION = 1

VECTOR = plugin_data_pb2.DiagnosticsPluginData.VECTOR
STRUCTURE = plugin_data_pb2.DiagnosticsPluginData.STRUCTURE

# Metric names (DESIGN.md). Per parameter tensor:
PARAM_METRICS = ("grad_norm", "grad_max_abs", "grad_nonfinite", "weight_norm", "update_ratio")
# Whole model:
MODEL_METRICS = ("grad_norm_total", "learning_rate", "amp_scale", "amp_skipped")
# Per activation site:
ACTIVATION_METRICS = ("dead_fraction", "saturation", "act_mean", "act_std")
# Loss, per component ("total" for `loss=`), and the spread of per-sample components:
LOSS_SPREAD_METRICS = ("loss_min", "loss_p05", "loss_p25", "loss_p50", "loss_p75", "loss_p95", "loss_max")
LOSS_METRICS = ("loss",) + LOSS_SPREAD_METRICS
# Per parameter, from the optimizer's view (issue 15): 1.0 where `.grad` is None at a logged step;
# Adam-family state: share of entries with sqrt(v_hat) < eps, RMS of m_hat / (sqrt(v_hat) + eps).
PARAM_OPTIMIZER_METRICS = ("grad_missing", "adam_eps_fraction", "update_rms")
# Output head (layer = the head module's qualified name): max |logit|, mean log-sum-exp over the last dim.
LOGIT_METRICS = ("logit_max_abs", "logit_lse")
# `Diagnostics.evaluate()`: val_loss (layer "total"), val_metric (layer = the user's metric name).
VALIDATION_METRICS = ("val_loss", "val_metric")
ALL_METRICS = (
    PARAM_METRICS + MODEL_METRICS + ACTIVATION_METRICS + LOSS_METRICS
    + PARAM_OPTIMIZER_METRICS + LOGIT_METRICS + VALIDATION_METRICS
)

# Whole model, from `Diagnostics.step(grad_norm=)` (the Trainer callback passes the Trainer's):
# the global gradient norm before clipping; `grad_norm_total` is the one after.
GRAD_NORM_PRECLIP = "grad_norm_preclip"
MODEL_METRICS += (GRAD_NORM_PRECLIP,)
ALL_METRICS += (GRAD_NORM_PRECLIP,)

STRUCTURE_TAG = PLUGIN_NAME + "/_structure"


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
    digest = hashlib.sha1("\n".join(layers).encode("utf-8")).hexdigest()[:10]
    return f"{PLUGIN_NAME}/{metric}/{digest}"


def create_summary_metadata(
    metric: str,
    layers: Sequence[str],
    layer_types: Sequence[str] = (),
    kind: int = VECTOR,
) -> summary_pb2.SummaryMetadata:
    """SummaryMetadata for one tag, carrying the metric and its layer names."""
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
