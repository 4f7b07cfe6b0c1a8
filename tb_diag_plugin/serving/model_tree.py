"""The model view's answer: the module tree collapsed to what fits a screen, its unhealthy branches open.

The tab used to fetch the whole structure document, every layer name and every site metric to colour
the tree itself (64 MB at 2,000 steps x 5,000 tensors). Here the server folds the findings' per-layer
verdicts and the recorded NaN/Inf values into modules, groups the modules along the tree
(`layer_groups`, the heatmaps' grouping) and sends only the rows that are shown: a group carries the
worst status of its members, how many of them hold a NaN/Inf and the mean, min and max of their last
gradient norms, so one bad tensor among thousands is never averaged away.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from tb_diag_plugin import layer_groups, metadata
from tb_diag_plugin.series import Series

# The values whose NaN/Inf mark a module: its gradients (a NaN weight follows from one) and its activation sites.
SCAN_METRICS = ("grad_norm",) + metadata.ACTIVATION_METRICS
VALUE_METRIC = "grad_norm"  # a group's mean/min/max: its members' gradient norms at the last logged step
NONFINITE = "nonfinite"  # a status beside the severities: a recorded NaN/Inf that no finding names
MAX_LISTED = 32  # parameters, sites and NaN/Inf layers listed per row; the rest are counted
OPEN_BUDGET = 4  # unhealthy branches are opened while the rows stay under this many times max_rows
_RANK = {"ok": 0, **{s: len(metadata.SEVERITIES) - i for i, s in enumerate(metadata.SEVERITIES)}}
_RANK[NONFINITE] = _RANK[metadata.SEVERITIES[0]]
_UNHEALTHY = {NONFINITE, *metadata.SEVERITIES[:2]}  # opened by default: errors, warnings and NaN/Inf
_NO_FINDINGS = ("ok", "no findings")


def modules_of(doc: Optional[dict], layers: dict[str, tuple[list[str], list[str]]]) -> list[dict]:
    """The modules in model order: the structure document's (one entry per name), or, without one, the
    modules that own the recorded parameters and activation sites (`layers`: metric -> (names, types))."""
    out: dict[str, dict] = {}
    if doc is not None:
        for m in doc.get("modules", []):
            have = out.get(m["name"])
            if have is None:
                out[m["name"]] = {**m, "params": list(m.get("params") or []), "sites": list(m.get("sites") or [])}
            else:  # a name written twice: one row with both members
                have["params"] += m.get("params") or []
                have["sites"] += m.get("sites") or []
        return list(out.values())
    out[""] = {"name": "", "type": "", "num_params": None, "params": [], "sites": []}
    seen: set[str] = set()
    for metric, (names, types) in layers.items():
        kind = metadata.METRICS[metric].layer_kind if metric in metadata.METRICS else ""
        if kind not in ("param", "site"):
            continue
        for n, t in zip(names, types):
            if n in seen:
                continue
            seen.add(n)
            mod = layer_groups.module_of(n, kind)
            m = out.setdefault(mod, {"name": mod, "type": "", "num_params": None, "params": [], "sites": []})
            if kind == "param":
                m["params"].append({"name": n, "shape": None, "numel": None, "tracked": True})
            else:
                m["sites"].append({"name": n, "type": t, "kind": ""})
    return list(out.values())


def first_nonfinite(series: Series, chunk: int = 2048) -> dict[str, int]:
    """Layer -> the first step at which it recorded a NaN/Inf value (layers that never did are left out).

    One sum per column finds the candidates (a NaN/Inf, an absent cell or an overflow makes it
    non-finite), then only their columns are read step by step, in chunks, so that a 20,000 x 5,000
    series needs neither a second pass over every cell nor a full-size temporary."""
    values, present = series.values, series.present
    with np.errstate(over="ignore", invalid="ignore"):
        cols = np.flatnonzero(~np.isfinite(np.add.reduce(values, axis=0)))
    if not cols.size:
        return {}
    if cols.size < values.shape[1] // 4:
        values, present = values[:, cols], present[:, cols]
    else:
        cols = np.arange(values.shape[1])
    first = np.full(cols.size, -1, dtype=np.int64)
    for a in range(0, values.shape[0], chunk):
        bad = ~np.isfinite(values[a:a + chunk]) & present[a:a + chunk]
        new = np.flatnonzero(bad.any(axis=0) & (first < 0))
        if new.size:
            first[new] = series.steps[a + bad[:, new].argmax(axis=0)]
    return {series.layers[cols[k]]: int(first[k]) for k in np.flatnonzero(first >= 0)}


def first_nonfinite_summarized(summary: Any, layers: Sequence[str],
                               raw: Callable[[int, int, np.ndarray], Any]) -> dict[str, int]:
    """`first_nonfinite` from a step summary (`reading.stepbins.StepSummary`): its non-finite counts name
    the layers and the bin of their first NaN/Inf, and only that bin's steps of those layers are read
    (`raw(first_step, last_step, cols)` -> a `downsample.Binned` of raw steps), not the whole metric."""
    bins = np.asarray(summary.nonfinite) > 0
    cols = np.flatnonzero(bins.any(axis=0))
    if not cols.size:
        return {}
    first_bin = bins[:, cols].argmax(axis=0)
    out: dict[str, int] = {}
    for b in np.unique(first_bin):
        group = cols[first_bin == b]
        got = raw(int(summary.step_first[b]), int(summary.step_last[b]), group)
        bad = (got.nonfinite > 0) & (got.present > 0)
        for j in np.flatnonzero(bad.any(axis=0)):
            out[layers[group[j]]] = int(got.step_first[bad[:, j].argmax()])
    return out


@dataclass(eq=False)
class Modules:
    """The modules in model order (`modules_of`) and their tree (`layer_groups.tree`): built once per data
    version of a run (`serving.model_data.modules`), since at 5,000 tensors building the tree took longer
    than the rest of an answer."""

    modules: list[dict]
    names: list[str] = field(init=False)
    pos: dict[str, int] = field(init=False)
    root: layer_groups.Row = field(init=False)

    has_members: list[bool] = field(init=False)  # a tracked parameter or an activation site of its own
    parent: list[int] = field(init=False)  # the nearest enclosing module in the list (-1: none)
    deepest_first: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.names = [m["name"] for m in self.modules]
        self.pos = {n: j for j, n in enumerate(self.names)}
        self.root = layer_groups.tree(self.names, "module")  # indexed as it is built
        self.has_members = [any(p.get("tracked") is not False for p in m["params"]) or bool(m["sites"])
                            for m in self.modules]
        self.parent = [self._parent(n) for n in self.names]
        self.deepest_first = sorted(range(len(self.names)), key=lambda j: -_depth(self.names[j]))

    def _parent(self, name: str) -> int:
        if name == "":
            return -1
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        while parent not in self.pos and parent:
            parent = parent.rsplit(".", 1)[0] if "." in parent else ""
        return self.pos.get(parent, -1)


def last_values(series: Optional[Series]) -> tuple[Optional[int], dict[str, float]]:
    """(last logged step, layer -> its value there) of a series; NaN/Inf values kept."""
    if series is None or not series.steps.size:
        return None, {}
    row, present = series.values[-1], series.present[-1]
    return int(series.steps[-1]), {n: float(row[j]) for j, n in enumerate(series.layers) if present[j]}


def _worst(issues: Sequence[tuple[str, str]]) -> Optional[tuple[str, str]]:
    best = None
    for i in issues:
        if best is None or _RANK[i[0]] > _RANK[best[0]]:
            best = i
    return best


def _depth(name: str) -> int:
    return 0 if name == "" else name.count(".") + 1


def answer(run: str, modules: Union[list[dict], Modules], verdicts: Optional[dict],
           nonfinite: dict[str, tuple[int, str]], grad: tuple[Optional[int], dict[str, float]], max_rows: int,
           expand: Sequence[str] = (), reveal: Sequence[str] = (), open_unhealthy: bool = True) -> dict:
    """The rows of the model view (see `tb_diag_plugin/http_api.md`, `/model`).

    `verdicts`: the findings' per-layer verdicts (`/findings`' `layers`), None while they are being
    computed; `nonfinite`: layer -> (first NaN/Inf step, its layer kind); `grad`: `last_values` of the
    gradient norms; `modules`: `modules_of`'s list, or the same in a `Modules` built earlier. ValueError names
    an `expand` key or a `reveal` module (or layer) that the tree does not have.
    """
    tree = modules if isinstance(modules, Modules) else Modules(modules)
    modules, names, pos, root = tree.modules, tree.names, tree.pos, tree.root
    analysed = verdicts is not None
    # Only the modules that have something to say get an entry (a few of 5,000): an answer that made
    # thousands of lists per request had Python's collector walk the server's whole heap now and then.
    own: dict[int, list[tuple[str, str]]] = {}
    for layer, v in (verdicts or {}).items():
        if v.get("severity") not in _RANK:
            continue
        kind = v.get("layer_kind", "")
        mod = layer_groups.module_of(layer, kind) if kind in ("param", "site", "module") else ""
        if mod not in pos:
            continue
        member = layer[len(mod) + 1:] if kind == "param" and mod else layer
        kinds = ", ".join(str(k).replace("_", " ") for k in v.get("kinds", []))
        own.setdefault(pos[mod], []).append((v["severity"], kinds if mod == layer else f"{member}: {kinds}"))
    bad_of: dict[int, list[tuple[str, int]]] = {}
    for layer, (step, kind) in nonfinite.items():
        mod = layer_groups.module_of(layer, kind)
        if mod not in pos:
            continue
        j = pos[mod]
        bad_of.setdefault(j, []).append((layer, step))
        what = "activations" if kind == "site" else "values"
        own.setdefault(j, []).append(
            (NONFINITE, f"{'' if layer == mod else layer + ': '}{what} NaN/Inf from step {step}"))
    for bad in bad_of.values():
        bad.sort(key=lambda x: (x[1], x[0]))
    worst = {j: _worst(x) for j, x in own.items()}
    # A module's status is the worst of its own and of every module under it (the root: the whole model).
    below: list[Optional[tuple[str, str]]] = [
        worst[j] if j in worst else _NO_FINDINGS if analysed and tree.has_members[j] else None
        for j in range(len(modules))]
    for j in tree.deepest_first:
        w = below[j]
        k = tree.parent[j]
        if w is None or k < 0:
            continue
        text = w[1] if w[1].startswith(names[j]) else f"{names[j]}: {w[1]}"
        if below[k] is None or _RANK[w[0]] > _RANK[below[k][0]]:
            below[k] = (w[0], text)

    shown = [_module_index(r, pos) for r in reveal]
    view = layer_groups.rows(root, max_rows, expand, shown)
    opened: list[str] = []
    if open_unhealthy:
        # A recorded NaN/Inf first (the most specific sign, even where a finding names every tensor), then worst first.
        sick = sorted((j for j, w in worst.items() if w and w[0] in _UNHEALTHY),
                      key=lambda j: (j not in bad_of, -_RANK[worst[j][0]], j))
        for j in sick[:64]:
            if any(r == j for r in view):
                continue
            trial = layer_groups.rows(root, max_rows, expand, shown + [j])
            if len(trial) > OPEN_BUDGET * max_rows and opened:
                break
            view, shown = trial, shown + [j]
            opened.append(names[j])

    grad_step, grad_values = grad

    def own_grad(j: int) -> list[float]:
        return [grad_values[p["name"]] for p in modules[j]["params"] if p["name"] in grad_values]

    rows = []
    for r in view:
        members = [r] if isinstance(r, int) else r.members
        if isinstance(r, int):
            m = modules[r]
            # A module row's values: its own parameters; a group's: every member's.
            status = below[r]
            row = {"key": m["name"], "label": m["name"] or "(model)", "group": False, "depth": _depth(m["name"]),
                   "type": m.get("type", ""), "num_params": m.get("num_params"),
                   "params": [{k: p.get(k) for k in ("name", "shape", "tracked")} for p in m["params"][:MAX_LISTED]],
                   "more_params": max(0, len(m["params"]) - MAX_LISTED),
                   "sites": [{k: s.get(k) for k in ("name", "type")} for s in m["sites"][:MAX_LISTED]],
                   "more_sites": max(0, len(m["sites"]) - MAX_LISTED)}
            gvals = own_grad(r)
        else:
            status = _worst([below[j] for j in members if below[j] is not None])
            base = r.key.split("[", 1)[0]
            numel = [p.get("numel") for j in members for p in modules[j]["params"]]
            row = {"key": r.key, "label": r.label, "group": True, "members": len(members),
                   "depth": _depth(base) + (1 if "[" in r.key else 0),
                   "num_params": sum(numel) if numel and all(isinstance(x, int) for x in numel) else None}
            gvals = [x for j in members for x in own_grad(j)]
        bad = [b for j in members for b in bad_of.get(j, ())]
        row.update(status=status[0] if status else "none", why=status[1] if status else "",
                   nonfinite=[list(b) for b in sorted(bad, key=lambda x: (x[1], x[0]))[:MAX_LISTED]],
                   nonfinite_layers=len(bad), first_nonfinite=min((b[1] for b in bad), default=None),
                   grad_norm=_summary(gvals))
        rows.append(row)
    return {"run": run, "num_modules": len(modules), "max_rows": max_rows, "findings_complete": analysed,
            "grad_step": grad_step,
            "opened": opened, "rows": rows}


def _module_index(name: str, pos: dict[str, int]) -> int:
    """The row of `name`: a module, or the module of a parameter or an activation site (a finding's layer)."""
    for mod in (name, layer_groups.module_of(name, "param"), metadata.site_module(name)):
        if mod in pos:
            return pos[mod]
    raise ValueError(f"no module or layer {name[:200]!r} in this model")


def _summary(values: list[float]) -> Optional[dict[str, Any]]:
    """Mean, min and max of the finite values and the count of NaN/Inf ones; None for no values."""
    if not values:
        return None
    a = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(a)
    fin = a[ok]
    return {"mean": float(fin.mean()) if fin.size else None, "min": float(fin.min()) if fin.size else None,
            "max": float(fin.max()) if fin.size else None, "nonfinite": int((~ok).sum()), "count": int(a.size)}
