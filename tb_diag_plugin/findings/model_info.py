"""What the findings rules know about the model: its layers, activations and optimizer.

Built from the structure document the logger writes once per run
(`tb_diag_logger.structure.module_tree`, read back by `reading.read_structure`),
so that advice fits the model ("replace sigmoid/tanh" only where there is
one, "add normalisation" only where there is none). Numpy-free and torch-free:
TensorBoard imports it. Documents written before a key existed give an empty
answer for it, never an error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from tb_diag_plugin import metadata

# Module types (class names) by what they mean for advice.
NORM_TYPES = frozenset({
    "LayerNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "GroupNorm", "InstanceNorm1d",
    "InstanceNorm2d", "InstanceNorm3d", "RMSNorm", "LlamaRMSNorm", "T5LayerNorm", "LocalResponseNorm",
})
# Recurrent cells gate with sigmoid/tanh inside one kernel that the activation hooks never see.
GATED_TYPES = frozenset({"LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"})
ATTENTION_TYPES = frozenset({"MultiheadAttention", "TransformerEncoderLayer", "TransformerDecoderLayer"})
ADAM_FAMILY = frozenset({"Adam", "AdamW", "Adamax", "NAdam", "RAdam", "SparseAdam", "FusedAdam", "AdamW8bit",
                         "Adam8bit", "PagedAdamW", "LAMB", "Lamb"})
_SATURATING_TYPES = frozenset({"Sigmoid", "Tanh", "Hardtanh", "Softsign", "F.sigmoid", "F.tanh"})


@dataclass(frozen=True)
class GroupInfo:
    """One optimizer parameter group: its hyper-parameters (None when the optimizer has none) and parameters."""

    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    eps: Optional[float] = None
    betas: Optional[tuple[float, ...]] = None
    momentum: Optional[float] = None
    params: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelInfo:
    """The model as the rules see it. `ModelInfo()` means "nothing known": every question answers neutrally."""

    module_types: Mapping[str, str] = field(default_factory=dict)  # qualified module name -> class name
    activations: Mapping[str, tuple[str, str]] = field(default_factory=dict)  # site -> (kind, type name)
    optimizer: Optional[str] = None  # class name
    groups: tuple[GroupInfo, ...] = ()
    requires_grad: Mapping[str, bool] = field(default_factory=dict)  # parameter -> requires_grad
    in_optimizer: Mapping[str, Optional[bool]] = field(default_factory=dict)  # parameter -> held by the optimizer
    known: bool = False  # built from a structure document
    order: tuple[str, ...] = ()  # module, parameter and site names in the model's own order

    @classmethod
    def from_structure(cls, doc: Optional[Mapping[str, Any]]) -> ModelInfo:
        """From the logger's structure document (any version; missing or malformed keys are left unknown)."""
        if doc is None:
            return cls()
        if not isinstance(doc, Mapping):
            raise TypeError(f"doc must be the structure document (a dict) or None, got {type(doc).__name__}")
        types: dict[str, str] = {}
        acts: dict[str, tuple[str, str]] = {}
        rg: dict[str, bool] = {}
        held: dict[str, Optional[bool]] = {}
        order: dict[str, None] = {}
        for m in doc.get("modules") or ():
            if not isinstance(m, Mapping):
                continue
            name = str(m.get("name", ""))
            types[name] = str(m.get("type", ""))
            order[name] = None
            for s in m.get("sites") or ():
                if isinstance(s, Mapping) and "name" in s:
                    acts[str(s["name"])] = (str(s.get("kind", "")), str(s.get("type", "")))
                    order[str(s["name"])] = None
            for p in m.get("params") or ():
                if not isinstance(p, Mapping) or "name" not in p:
                    continue
                order[str(p["name"])] = None
                if isinstance(p.get("requires_grad"), bool):
                    rg[str(p["name"])] = p["requires_grad"]
                if "in_optimizer" in p:
                    v = p["in_optimizer"]
                    held[str(p["name"])] = v if isinstance(v, bool) else None
        opt = doc.get("optimizer")
        opt_class: Optional[str] = None
        groups: list[GroupInfo] = []
        if isinstance(opt, Mapping):
            opt_class = str(opt["class"]) if opt.get("class") else None
            for gr in opt.get("groups") or ():
                if isinstance(gr, Mapping):
                    groups.append(_group(gr))
        return cls(types, acts, opt_class, tuple(groups), rg, held, known=True, order=tuple(order))

    # ---------------------------------------------------------------- questions the advice asks
    @property
    def type_names(self) -> frozenset[str]:
        return frozenset(self.module_types.values())

    @property
    def norm_layers(self) -> list[str]:
        """Qualified names of the normalisation modules."""
        return [n for n, t in self.module_types.items() if t in NORM_TYPES]

    @property
    def has_norm(self) -> bool:
        return bool(self.norm_layers)

    @property
    def saturating(self) -> list[str]:
        """Activation sites and modules that saturate (sigmoid, tanh, recurrent gates)."""
        out = [n for n, (k, t) in self.activations.items()
               if k in metadata.SATURATING_KINDS or t in _SATURATING_TYPES]
        out += [n for n, t in self.module_types.items() if t in GATED_TYPES or t in _SATURATING_TYPES]
        rank = {n: i for i, n in enumerate(self.order)}
        return sorted(set(out), key=lambda n: (rank.get(n, len(rank)), n))  # model order, not text order

    @property
    def relu_family(self) -> bool:
        return any(k in metadata.DEAD_UNIT_KINDS for k, _ in self.activations.values())

    @property
    def activation_types(self) -> list[str]:
        """The distinct activation type names ('GELU', 'F.relu', ...), sorted."""
        return sorted({t for _, t in self.activations.values() if t})

    @property
    def is_transformer(self) -> bool:
        names = self.type_names
        return bool(names & ATTENTION_TYPES) or any("Attention" in t for t in names)

    @property
    def adam_family(self) -> bool:
        return self.optimizer is not None and (self.optimizer in ADAM_FAMILY or "Adam" in self.optimizer)

    def frozen(self, param: str) -> bool:
        """Frozen on purpose: requires_grad False, or (with an optimizer given) in no optimizer group."""
        return self.requires_grad.get(param) is False or self.in_optimizer.get(param) is False

    def held(self, param: str) -> Optional[bool]:
        """Whether the optimizer holds `param`: True/False, or None when the document does not say."""
        v = self.in_optimizer.get(param)
        if v is not None:
            return v
        for g in self.groups:
            if param in g.params:
                return True
        return False if self.groups and any(g.params for g in self.groups) else None

    def hyper(self, key: str) -> list[float]:
        """The finite values of one hyper-parameter ('lr', 'weight_decay', 'eps', 'momentum') over the groups."""
        out = []
        for g in self.groups:
            v = getattr(g, key)
            if isinstance(v, (int, float)) and math.isfinite(v):
                out.append(float(v))
        return out

    def decay_products(self) -> list[tuple[float, float, float]]:
        """(lr x weight_decay, lr, weight_decay) for each group that decays."""
        return [(g.lr * g.weight_decay, g.lr, g.weight_decay) for g in self.groups
                if g.lr is not None and g.weight_decay and math.isfinite(g.lr * g.weight_decay)]


def _num(v: Any) -> Optional[float]:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def _group(gr: Mapping[str, Any]) -> GroupInfo:
    betas = gr.get("betas")
    if isinstance(betas, (list, tuple)) and all(_num(b) is not None for b in betas):
        betas_t: Optional[tuple[float, ...]] = tuple(float(b) for b in betas)
    else:
        betas_t = None
    params = gr.get("params")
    names = tuple(str(p) for p in params) if isinstance(params, (list, tuple)) else ()
    return GroupInfo(_num(gr.get("lr")), _num(gr.get("weight_decay")), _num(gr.get("eps")), betas_t,
                     _num(gr.get("momentum")), names)


def read_model(read_doc: Callable[[], Optional[Mapping[str, Any]]]) -> tuple[ModelInfo, list[str]]:
    """`ModelInfo` from a reader of the structure document, and a note when it could not be read.

    An unreadable document costs only the advice that fits the model: the
    findings are still computed, with general advice.
    """
    try:
        return ModelInfo.from_structure(read_doc()), []
    except Exception as e:  # a damaged or foreign document must not cost the findings
        return ModelInfo(), [f"model structure unreadable ({type(e).__name__}: {e}); advice is general"]
