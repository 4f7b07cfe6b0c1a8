"""Per-layer verdicts: what the findings say about each layer they name (the model view's colours)."""

from __future__ import annotations

from typing import Mapping, Sequence

from tb_diag_plugin import metadata
from tb_diag_plugin.findings.context import Finding


def layer_kinds(layers: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """Layer name -> what it is (the contract's LAYER_KINDS), from the metrics that record it
    (`layers`: metric -> its layer names, as a run's listing gives them).

    Metrics are looked at in the contract's order, so a name recorded both
    per parameter and elsewhere counts as a parameter.
    """
    out: dict[str, str] = {}
    for spec in metadata.METRIC_SPECS:
        for name in layers.get(spec.name, ()):
            out.setdefault(name, spec.layer_kind)
    return out


def layer_verdicts(found: Sequence[Finding], layers: Mapping[str, Sequence[str]]) -> dict[str, dict]:
    """Per layer named by a finding: its worst severity, the kinds that name it, and its layer kind
    (`layers`: metric -> its layer names).

    JSON-safe: ``{"0.weight": {"severity": "error", "kinds": ["nonfinite", ...],
    "layer_kind": "param"}}``, kinds in the contract's order. A layer no
    recorded metric holds takes the layer kind of the metric its finding opens.
    """
    kinds_of = layer_kinds(layers)
    rank = {k: i for i, k in enumerate(metadata.FINDING_KINDS)}
    out: dict[str, dict] = {}
    for f in found:
        _, metric = metadata.FINDING_VIEW[f.kind]
        fallback = metadata.METRICS[metric].layer_kind if metric else "loss"
        for name in f.layers:
            v = out.setdefault(name, {"severity": f.severity, "kinds": [], "layer_kind": kinds_of.get(name, fallback)})
            if metadata.SEVERITY_RANK[f.severity] < metadata.SEVERITY_RANK[v["severity"]]:
                v["severity"] = f.severity
            if f.kind not in v["kinds"]:
                v["kinds"].append(f.kind)
                v["kinds"].sort(key=rank.__getitem__)
    return out
