"""Layers grouped along the module tree, so that a view of 5,000 tensors fits a screen.

Steps are binned to the screen's width (`reading.downsample`); this does the
same for the other axis. A metric's layers hang on the module tree (a
parameter on its module, an activation site on the module it belongs to, a
module on itself); a group is a module with more than one layer under it,
and a module with a single child is merged into it ("model.layers" rather
than "model" then "layers"). A module with more than `FANOUT` children (a
flat `nn.Sequential` of 5,000 layers) is split into ranges of consecutive
children ("0 … 63"). A view shows the deepest level of the tree whose rows
fit (blocks, then layers, then tensors); each group carries the mean, min,
max and the non-finite count of its members (`aggregate`), so an outlier
tensor or a NaN is never averaged away.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence, Union

import numpy as np

from tb_diag_plugin import metadata

FANOUT = 64  # the most children a group shows when expanded: a 48-block model shows its 48 blocks

Row = Union["Group", int]  # a group, or a layer (its column in the metric's layer list)


@dataclass(eq=False)
class Group:
    """A module (or a range of a module's children) with more than one layer under it."""

    key: str  # the module's name, or "<module>[a:b]" for its children a to b-1
    label: str  # what the tab shows: "(model)" for the root
    members: list[int]  # the layers under it, in model order
    children: list[Row] = field(default_factory=list)


def module_of(name: str, layer_kind: str) -> str:
    """The module a layer hangs on: a parameter's owner ("enc.0.weight" -> "enc.0"), an activation site's
    module, a module itself; layers of the whole model or of the loss hang on the root ("")."""
    if layer_kind == "param":
        return name.rsplit(".", 1)[0] if "." in name else ""
    if layer_kind == "site":
        return metadata.site_module(name)
    if layer_kind == "module":
        return name
    return ""


class _Node:
    def __init__(self, path: str) -> None:
        self.path = path
        self.items: list[Union[_Node, int]] = []  # sub-modules and layers, in order of first appearance
        self.subs: dict[str, _Node] = {}


def build(layers: Sequence[str], layer_kind: str) -> Row:
    """The module tree of `layers` (in model order) as nested groups; a single layer is its column."""
    if not layers:
        raise ValueError("no layers to group")
    root = _Node("")
    for j, name in enumerate(layers):
        node = root
        module = module_of(name, layer_kind)
        if module:
            path = ""
            for part in module.split("."):
                path = f"{path}.{part}" if path else part
                sub = node.subs.get(part)
                if sub is None:
                    sub = node.subs[part] = _Node(path)
                    node.items.append(sub)
                node = sub
        node.items.append(j)
    return _simplify(root, layers)


def _simplify(node: _Node, layers: Sequence[str]) -> Row:
    items = [_simplify(x, layers) if isinstance(x, _Node) else x for x in node.items]
    if len(items) == 1:  # a module with one child is that child
        return items[0]
    items = _ranges(node.path, items, layers)
    members = [j for x in items for j in ([x] if isinstance(x, int) else x.members)]
    return Group(node.path, node.path or "(model)", members, items)


def _label(row: Row, layers: Sequence[str]) -> str:
    return layers[row] if isinstance(row, int) else row.label


def _ranges(path: str, items: list[Row], layers: Sequence[str], offset: int = 0) -> list[Row]:
    """`items` split into at most FANOUT ranges of consecutive children (recursively), when there are more."""
    if len(items) <= FANOUT:
        return items
    size = FANOUT
    while -(-len(items) // size) > FANOUT:
        size *= FANOUT
    out: list[Row] = []
    for a in range(0, len(items), size):
        chunk = _ranges(path, items[a:a + size], layers, offset + a)
        if len(chunk) == 1:
            out.append(chunk[0])
            continue
        lo, hi = offset + a, offset + a + len(items[a:a + size])
        members = [j for x in chunk for j in ([x] if isinstance(x, int) else x.members)]
        label = f"{_label(chunk[0], layers)} … {_label(chunk[-1], layers)}"
        out.append(Group(f"{path}[{lo}:{hi}]", label, members, chunk))
    return out


def _index(root: Row) -> tuple[dict[str, Group], dict[int, Optional[Group]], dict[int, Optional[Group]]]:
    """(groups by key, parent of each group by id, parent of each layer)."""
    groups: dict[str, Group] = {}
    parent: dict[int, Optional[Group]] = {}
    layer_parent: dict[int, Optional[Group]] = {}
    stack: list[tuple[Row, Optional[Group]]] = [(root, None)]
    while stack:
        row, up = stack.pop()
        if isinstance(row, int):
            layer_parent[row] = up
            continue
        groups.setdefault(row.key, row)
        parent[id(row)] = up
        stack.extend((c, row) for c in reversed(row.children))
    return groups, parent, layer_parent


def rows(root: Row, max_rows: int, expand: Iterable[str] = (), reveal: Iterable[int] = ()) -> list[Row]:
    """The rows of a view: the deepest level of the tree with at most `max_rows` rows (at least the
    root), then each group in `expand` replaced by its children and each layer in `reveal` (columns)
    made a row of its own, whatever `max_rows` says (a group shows at most FANOUT children).

    ValueError names a key of `expand` that is not a group of this tree.
    """
    if max_rows < 1:
        raise ValueError("max_rows must be >= 1")
    out: list[Row] = [root]
    while True:
        nxt = [c for r in out for c in ([r] if isinstance(r, int) else r.children)]
        if len(nxt) == len(out) or len(nxt) > max_rows:
            break
        out = nxt
    groups, parent, layer_parent = _index(root)
    targets: list[Group] = []
    for key in expand:
        if key not in groups:
            raise ValueError(f"no group {key[:200]!r} in this view")
        targets.append(groups[key])
    for j in reveal:
        up = layer_parent.get(j)
        if up is not None:
            targets.append(up)
    for g in targets:
        chain = [g]  # g and its ancestors, down from the one that is a row now
        while parent.get(id(chain[-1])) is not None:
            chain.append(parent[id(chain[-1])])
        for anc in reversed(chain):
            at = next((i for i, r in enumerate(out) if r is anc), None)
            if at is not None:
                out[at:at + 1] = anc.children
    return out


@dataclass
class Aggregated:
    """Rows are step bins; columns are the view's rows (groups and layers)."""

    mean: np.ndarray  # float32 [B, R]: mean of the finite values of the members in the cell
    min: np.ndarray  # float32 [B, R]: smallest finite value (NaN if none)
    max: np.ndarray  # float32 [B, R]: largest finite value (NaN if none)
    nonfinite: np.ndarray  # float32 [B, R]: NaN/Inf values of the members in the cell
    present: np.ndarray  # float32 [B, R]: values recorded


def aggregate(mean: np.ndarray, mn: np.ndarray, mx: np.ndarray, nonfinite: np.ndarray, present: np.ndarray,
              view: Sequence[Row]) -> Aggregated:
    """Columns of a binned matrix (`downsample.Binned`'s arrays, [B, L]) combined per row of `view`.

    A cell's mean is weighted by its count of finite values, so a group's mean is the mean of every
    finite value of its members in the bin; min, max and the non-finite count are kept, so one
    tensor's spike or NaN shows in its group. A layer's own column is passed through unchanged.
    """
    cols = [np.array([r]) if isinstance(r, int) else np.asarray(r.members) for r in view]
    perm = np.concatenate(cols)
    ends = np.cumsum([c.size for c in cols])
    spans = list(zip(np.concatenate([[0], ends[:-1]]), ends))
    # Usually the tree's order is the model's: members are contiguous and nothing is copied.
    same = perm.size == mean.shape[1] and bool((perm == np.arange(perm.size)).all())

    def cols_of(a: np.ndarray) -> np.ndarray:
        return a if same else a[:, perm]

    # Only groups are reduced (a layer's row is its own column, filled in below); each group's columns are
    # one slice, reduced along its inner axis: ~10x faster than ufunc.reduceat along axis 1 here.
    groups = [c for c, r in enumerate(view) if not isinstance(r, int)]

    def reduce(ufunc, a: np.ndarray, dtype=None) -> np.ndarray:
        out = np.zeros((a.shape[0], len(spans)), dtype or a.dtype)
        for c in groups:
            s, e = spans[c]
            out[:, c] = ufunc.reduce(a[:, s:e], axis=1, dtype=dtype)
        return out

    pres, bad = cols_of(present), cols_of(nonfinite)
    weight = pres - bad  # finite values per cell
    empty = ~(weight > 0)  # no finite value (unbinned cells hold raw values: absent or NaN/Inf ones too)
    m, lo, hi = cols_of(mean), cols_of(mn), cols_of(mx)
    if empty.any():
        nan = np.float32(np.nan)
        m, lo, hi = np.where(empty, np.float32(0), m), np.where(empty, nan, lo), np.where(empty, nan, hi)
    sums = reduce(np.add, m * weight, np.float64)
    counts = reduce(np.add, weight, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        g_mean = (sums / counts).astype(np.float32)
    g_mean[counts == 0] = np.nan
    g_min, g_max = reduce(np.fmin, lo).astype(np.float32), reduce(np.fmax, hi).astype(np.float32)
    g_bad = reduce(np.add, bad).astype(np.float32)
    g_present = reduce(np.add, pres).astype(np.float32)
    leaves = [i for i, r in enumerate(view) if isinstance(r, int)]
    if leaves:
        src = [view[i] for i in leaves]
        g_mean[:, leaves], g_min[:, leaves], g_max[:, leaves] = mean[:, src], mn[:, src], mx[:, src]
        g_bad[:, leaves], g_present[:, leaves] = nonfinite[:, src], present[:, src]
    return Aggregated(g_mean, g_min, g_max, g_bad, g_present)


def describe(layers: Sequence[str], layer_kind: str, members: Sequence[int]) -> list[str]:
    """`members` (columns of `layers`) named by the largest groups that hold nothing else, in model order,
    runs of numbered siblings merged: ["all 32 tensors of each of model.layers.10-14.mlp.experts",
    "lm_head.weight"]. A finding that names hundreds of tensors names these first, its tensors on demand."""
    if not members:
        return []
    root = build(layers, layer_kind)
    want = set(members)
    found: list[tuple[str, int]] = []  # (label, members; 0 for a single layer)

    def walk(row: Row) -> None:
        if isinstance(row, int):
            if row in want:
                found.append((layers[row], 0))
        elif want.issuperset(row.members):
            found.append((row.label, len(row.members)))
        elif not want.isdisjoint(row.members):
            for c in row.children:
                walk(c)

    walk(root)
    out: list[str] = []
    i = 0
    while i < len(found):
        label, n = found[i]
        run = _numbered_run(found, i)
        if run:
            k, merged = run
            out.append(f"all {n} tensors of each of {merged}" if n else merged)
            i += k
            continue
        out.append(f"all {n} tensors of {label}" if n else label)
        i += 1
    return out


def _numbered_run(found: list[tuple[str, int]], i: int) -> Optional[tuple[int, str]]:
    """(length, merged label) of the run of entries from `i` that differ only by one dotted number
    counting up by one (blocks 10, 11, 12 ...) with the same member count; None for a run under 3."""
    parts = found[i][0].split(".")
    for pos, p in enumerate(parts):
        if not p.isdigit():
            continue
        k = 1
        while i + k < len(found) and found[i + k][1] == found[i][1]:
            nxt = found[i + k][0].split(".")
            if (len(nxt) != len(parts) or nxt[:pos] != parts[:pos] or nxt[pos + 1:] != parts[pos + 1:]
                    or nxt[pos] != str(int(p) + k)):
                break
            k += 1
        if k >= 3:
            return k, ".".join(parts[:pos] + [f"{p}-{int(p) + k - 1}"] + parts[pos + 1:])
    return None
