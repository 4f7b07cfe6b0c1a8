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

import itertools
import weakref
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from tb_diag_plugin import metadata

FANOUT = 64  # the most children a group shows when expanded: a 48-block model shows its 48 blocks

Row = Union["Group", int]  # a group, or a layer (its column in the metric's layer list)


class Group:
    """A module (or a range of a module's children) with more than one layer under it.

    Slotted, its members a `range` where they are consecutive (they are in model order): a server keeps
    a tree per layer set of every run it shows, and every container in them is one more object for
    Python's collector to walk on each full collection.
    """

    __slots__ = ("key", "label", "members", "children", "__weakref__")

    def __init__(self, key: str, label: str, members: Sequence[int], children: Optional[list[Row]] = None) -> None:
        self.key = key  # the module's name, or "<module>[a:b]" for its children a to b-1
        self.label = label  # what the tab shows: "(model)" for the root
        self.members = _compact(members)  # the layers under it, in model order
        self.children: list[Row] = [] if children is None else children

    def __repr__(self) -> str:
        return f"Group({self.key!r}, {len(self.members)} members, {len(self.children)} children)"


def _compact(members: Sequence[int]) -> Sequence[int]:
    """`members` as a range when they are consecutive and ascending, else as a list."""
    if isinstance(members, range):
        return members
    n = len(members)
    if n and members[-1] - members[0] + 1 == n and all(b == a + 1 for a, b in zip(members, members[1:])):
        return range(members[0], members[-1] + 1)
    return list(members)


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


# Trees by layer kind and names, while something holds them: the metrics of one layer set (a gradient's
# norm, max and weight norm, ...) share one tree rather than each building and keeping its own.
_TREES: weakref.WeakValueDictionary[tuple, Group] = weakref.WeakValueDictionary()


def tree(layers: Sequence[str], layer_kind: str) -> Row:
    """`build`, shared with every other caller that asks for the same names and kind while it is kept."""
    key = (layer_kind, tuple(layers))
    got = _TREES.get(key)
    if got is None:
        got = build(layers, layer_kind)
        if isinstance(got, Group):
            _index(got)  # built now, with the tree, rather than by a request's first `rows`
            _TREES[key] = got
    return got


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


# Each tree's index, kept as long as the tree is (a series' tree, the model view's): a view of 5,000 tensors
# asks `rows` several times per answer, and walking the tree took longer than choosing the rows.
_INDEXES: weakref.WeakKeyDictionary[Group, tuple] = weakref.WeakKeyDictionary()


def _index(root: Row) -> tuple[dict[str, Group], dict[int, Optional[Group]], dict[int, Optional[Group]]]:
    """(groups by key, parent of each group by id, parent of each layer), built once per tree (a tree is
    not changed once built)."""
    if isinstance(root, Group):
        got = _INDEXES.get(root)
        if got is None:
            got = _INDEXES[root] = _walk(root)
        return got
    return _walk(root)


def _walk(root: Row) -> tuple[dict[str, Group], dict[int, Optional[Group]], dict[int, Optional[Group]]]:
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


def levels(root: Row, max_rows: int) -> Iterator[list[Row]]:
    """The levels of the tree from the root down (each group replaced by its children), as long as they have
    at most `max_rows` rows (the root always) and the tree goes deeper."""
    level: list[Row] = [root]
    while True:
        yield level
        nxt = [c for r in level for c in ([r] if isinstance(r, int) else r.children)]
        if len(nxt) == len(level) or len(nxt) > max_rows:
            return
        level = nxt


def rows(root: Row, max_rows: int, expand: Iterable[str] = (), reveal: Iterable[int] = (),
         reveal_rows: Optional[int] = None) -> list[Row]:
    """The rows of a view: the deepest level of the tree with at most `max_rows` rows (at least the
    root), then each group in `expand` replaced by its children, whatever `max_rows` says (a group shows
    at most FANOUT children), then each layer in `reveal` (columns, in order) made a row of its own: every
    one, or with `reveal_rows`, the first and each later one where the view stays within that many rows
    (or does not grow).

    ValueError names a key of `expand` that is not a group of this tree.
    """
    if max_rows < 1:
        raise ValueError("max_rows must be >= 1")
    *_, out = levels(root, max_rows)
    groups, parent, layer_parent = _index(root)

    def opened(view: list[Row], g: Group) -> list[Row]:
        chain = [g]  # g and its ancestors, down from the one that is a row now
        while parent.get(id(chain[-1])) is not None:
            chain.append(parent[id(chain[-1])])
        view = list(view)
        for anc in reversed(chain):
            at = next((i for i, r in enumerate(view) if r is anc), None)
            if at is not None:
                view[at:at + 1] = anc.children
        return view

    for key in expand:
        if key not in groups:
            raise ValueError(f"no group {key[:200]!r} in this view")
        out = opened(out, groups[key])
    # With `reveal_rows`, revealed layers (a finding's) get rows while the view fits (the first one always);
    # the rest stay in their groups: 64 layers spread over a model's blocks would otherwise open several
    # hundred rows that no screen shows.
    shown = False
    for j in reveal:
        up = layer_parent.get(j)
        if up is None:
            continue
        more = opened(out, up)
        if shown and reveal_rows is not None and len(more) > max(reveal_rows, len(out)):
            continue
        out, shown = more, True
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
    tensor's spike or NaN shows in its group. A layer's own column is passed through unchanged. The
    counts may be any numeric type, and `present` a broadcast view (a step summary's compact arrays).
    """
    B, R = mean.shape[0], len(view)
    out = tuple(np.empty((B, R), np.float32) for _ in range(5))
    g_mean, g_min, g_max, g_bad, g_present = out
    # Groups are reduced a batch at a time: groups taken in order until their members make BATCH columns
    # (a slice where they are consecutive, as in model order, else gathered). The temporaries stay a batch
    # wide (or a big group's), not the whole matrix, whose fresh pages cost more than the arithmetic at
    # 1,000 bins x 5,000 tensors; and the sixty-four small groups of an opened group share one pass over
    # their columns, then a few reductions each.
    batch: list[tuple[int, Group]] = []
    width = 0
    arrays = (mean, mn, mx, nonfinite, present)
    for c, r in enumerate(view):
        if isinstance(r, int):
            continue
        batch.append((c, r))
        width += len(r.members)
        if width >= BATCH:
            _reduce_batch(batch, arrays, out)
            batch, width = [], 0
    if batch:
        _reduce_batch(batch, arrays, out)
    leaves = [i for i, r in enumerate(view) if isinstance(r, int)]
    if leaves:
        src = [view[i] for i in leaves]
        g_mean[:, leaves], g_min[:, leaves], g_max[:, leaves] = mean[:, src], mn[:, src], mx[:, src]
        g_bad[:, leaves], g_present[:, leaves] = nonfinite[:, src], present[:, src]
    return Aggregated(g_mean, g_min, g_max, g_bad, g_present)


BATCH = 1024  # columns reduced together (see `aggregate`)


def _reduce_batch(batch: list[tuple[int, Group]], arrays: tuple, out: tuple) -> None:
    """Columns of `out` for a batch of groups: their members' columns side by side (a slice where they are
    consecutive, as in model order; else gathered), reduced per group."""
    mean, mn, mx, nonfinite, present = arrays
    ends = np.cumsum([len(r.members) for _, r in batch]).tolist()
    spans = list(zip([0, *ends[:-1]], ends))
    cs = [c for c, _ in batch]
    ranges = [r.members for _, r in batch]
    if all(isinstance(m, range) for m in ranges) and all(a.stop == b.start for a, b in zip(ranges, ranges[1:])):
        cols: Union[slice, np.ndarray] = slice(ranges[0].start, ranges[-1].stop)
    else:
        cols = np.concatenate([np.asarray(m, dtype=np.int64) for m in ranges])
    m, lo, hi, bad = mean[:, cols], mn[:, cols], mx[:, cols], nonfinite[:, cols]
    if present.strides[1] != 0:  # counts per cell: the general case
        _reduce(cs, spans, m, lo, hi, bad, present[:, cols], out)
        return
    # One count per bin (a step summary's): the groups without a NaN/Inf take `_uniform`.
    count = present[:, 0]
    col_bad = bad.any(axis=0)
    # each run of consecutive groups of one kind (clean or not) on its own slice of the batch
    for clean, same in itertools.groupby(range(len(cs)), key=lambda i: not col_bad[slice(*spans[i])].any()):
        run = list(same)
        a, b = spans[run[0]][0], spans[run[-1]][1]
        at = [cs[i] for i in run]
        sub = [(spans[i][0] - a, spans[i][1] - a) for i in run]
        if clean:
            _uniform(at, sub, m[:, a:b], lo[:, a:b], hi[:, a:b], count, out)
        else:
            _reduce(at, sub, m[:, a:b], lo[:, a:b], hi[:, a:b], bad[:, a:b],
                    np.broadcast_to(count[:, None], (count.size, b - a)), out)


def _reduce(cs: list[int], spans: list[tuple[int, int]], mean: np.ndarray, mn: np.ndarray, mx: np.ndarray,
            nonfinite: np.ndarray, present: np.ndarray, out: tuple) -> None:
    """Column cs[i] of `out` from the columns spans[i] of these [B, W] arrays (a batch of groups' members)."""
    g_mean, g_min, g_max, g_bad, g_present = out
    pres = np.asarray(present, dtype=np.float32)
    bad = np.asarray(nonfinite, dtype=np.float32)
    weight = pres - bad  # finite values per cell
    ok = weight > 0  # else no finite value (unbinned cells hold raw values: absent or NaN/Inf ones too)
    nan = np.float32(np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):  # NaN/Inf means of cells left out below
        weighted = np.where(ok, weight * mean, np.float32(0))
    lo, hi = np.where(ok, mn, nan), np.where(ok, mx, nan)
    for c, (s, e) in zip(cs, spans):
        counts = np.add.reduce(weight[:, s:e], axis=1, dtype=np.float64)
        sums = np.add.reduce(weighted[:, s:e], axis=1, dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            g_mean[:, c] = np.where(counts > 0, sums / counts, np.nan)
        g_min[:, c] = np.fmin.reduce(lo[:, s:e], axis=1)
        g_max[:, c] = np.fmax.reduce(hi[:, s:e], axis=1)
        g_bad[:, c] = np.add.reduce(bad[:, s:e], axis=1)
        g_present[:, c] = np.add.reduce(pres[:, s:e], axis=1)


def _uniform(cs: list[int], spans: list[tuple[int, int]], mean: np.ndarray, mn: np.ndarray, mx: np.ndarray,
             count: np.ndarray, out: tuple) -> None:
    """`_reduce` where every member was recorded at every step of each bin (`count` per bin: a step summary's
    broadcast `present`) and none holds a NaN/Inf: each member's weight in a bin is that count, and the masks
    are not needed (the same numbers: the same float32 products, summed in float64; counts exact below
    2**24)."""
    g_mean, g_min, g_max, g_bad, g_present = out
    count = np.asarray(count, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        weighted = mean * count[:, None]
    empty = ~(count > 0)  # a bin without a step: whatever its cells hold, no value
    count64 = count.astype(np.float64)
    for c, (s, e) in zip(cs, spans):
        with np.errstate(invalid="ignore", divide="ignore"):
            g_mean[:, c] = np.add.reduce(weighted[:, s:e], axis=1, dtype=np.float64) / (count64 * (e - s))
        g_min[:, c] = np.fmin.reduce(mn[:, s:e], axis=1)
        g_max[:, c] = np.fmax.reduce(mx[:, s:e], axis=1)
        g_mean[empty, c] = g_min[empty, c] = g_max[empty, c] = np.nan
        g_bad[:, c] = 0
        g_present[:, c] = count * np.float32(e - s)


# ---------------------------------------------------------------- words
# A finding that names hundreds of tensors names the groups first (`describe`), the tensors on demand
# (its `layers` stay complete); the report and the tab print the same words.

SHOWN = 4  # names, groups or alternatives ("{w1,w2,w3}") the words show before "... (N in all)"


@dataclass(frozen=True)
class _Numbers:
    """Sibling numbers at one position of a name, as runs: ((3, 9), (20, 24)) for blocks 3-9 and 20-24."""

    spans: tuple[tuple[int, int], ...]

    def count(self) -> int:
        return sum(b - a + 1 for a, b in self.spans)

    def text(self) -> str:
        parts = [str(a) if a == b else f"from {a} to {b}" for a, b in self.spans]
        return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"


@dataclass(frozen=True)
class _Alt:
    """Sibling names at one position: {w1,w2,w3}."""

    options: tuple[str, ...]


Token = Union[str, _Numbers, _Alt]


@dataclass
class _Entry:
    tokens: tuple[Token, ...]  # the dotted parts of a name, or of a pattern of names
    complete: bool  # a module every recorded tensor of which is named (not one tensor)
    count: int  # names it stands for


class _Trie:
    __slots__ = ("subs", "leaf", "size", "hits")

    def __init__(self) -> None:
        self.subs: dict[str, _Trie] = {}
        self.leaf = False
        self.size = 0  # names at or under this node
        self.hits = 0  # of those, the named ones

    def insert(self, parts: Sequence[str], named: bool) -> None:
        node = self
        node.size += 1
        node.hits += named
        for p in parts:
            sub = node.subs.get(p)
            if sub is None:
                sub = node.subs[p] = _Trie()
            node = sub
            node.size += 1
            node.hits += named
        node.leaf = True

    def at(self, tokens: Sequence[Token]) -> Optional[_Trie]:
        """The node of a pattern's prefix (a number or alternative: its first), None if absent."""
        node: Optional[_Trie] = self
        for t in tokens:
            key = t if isinstance(t, str) else (str(t.spans[0][0]) if isinstance(t, _Numbers) else t.options[0])
            node = node.subs.get(key) if node is not None else None
        return node

    def numbered(self) -> int:
        """How many children are numbered 0, 1, 2, ... (a ModuleList's), 0 if they are not all numbered."""
        keys = list(self.subs)
        return len(keys) if keys and keys == [str(i) for i in range(len(keys))] else 0


def describe(names: Sequence[str], universe: Optional[Sequence[str]] = None, shown: int = SHOWN) -> str:
    """A finding's tensors in words: up to `shown` names quoted as they are ("'a', 'b'"); past that, the
    groups along the module tree, in model order, numbered siblings as runs ("{w1,w2,w3}.weight of
    mlp.experts from 0 to 31 of model.layers from 10 to 14"), the first `shown` groups then "... (N in all)".

    `universe` (every tensor of the metric, in model order) lets the words say "all": a module whose
    tensors are all named is one group ("all 32 mlp.experts of model.layers from 10 to 14 (5 of 40)");
    without it the words only compress the names. When grouping does not at least halve the list, the
    first `shown` names are quoted, as for a short one.
    """
    names = list(dict.fromkeys(str(n) for n in names))
    if shown < 1:
        raise ValueError(f"shown must be >= 1, got {shown}")
    if len(names) <= shown:
        return ", ".join(_quote(n) for n in names)
    trie: Optional[_Trie] = None
    if universe is not None:
        trie = _Trie()
        named = set(names)
        for n in dict.fromkeys([*map(str, universe), *names]):
            trie.insert(n.split("."), n in named)
        entries = _collapse(trie)
    else:
        entries = [_Entry(tuple(n.split(".")), False, 1) for n in names]
    entries = _merge(entries)
    if 2 * len(entries) >= len(names):  # groups of two names or fewer read worse than the names themselves
        return f"{', '.join(_quote(n) for n in names[:shown])}, ... ({len(names)} in all)"
    words = [_words(e, trie) for e in entries[:shown]]
    return "; ".join(words) + (f"; ... ({len(names)} in all)" if len(entries) > shown else "")


def _quote(name: str) -> str:
    return f"'{name}'"


def _numeric(name: str) -> bool:
    """A name made of numbers only ('0', '3.1': modules of an nn.Sequential), which reads as a count unquoted."""
    return all(part.isdigit() for part in name.split("."))


def _collapse(trie: _Trie) -> list[_Entry]:
    """The largest modules whose every tensor is named, and the named tensors outside them, in model order."""
    out: list[_Entry] = []
    stack: list[tuple[_Trie, tuple[str, ...]]] = [(trie, ())]
    while stack:
        node, path = stack.pop()
        if not node.hits:
            continue
        if node.hits == node.size and node.size > 1:
            while len(node.subs) == 1 and not node.leaf:  # "mlp" holding only "experts": name the experts
                (part, node), = node.subs.items()
                path = (*path, part)
            out.append(_Entry(path, True, node.size))
            continue
        if node.leaf and node.hits and (node.hits > sum(s.hits for s in node.subs.values())):
            out.append(_Entry(path, False, 1))
        stack.extend((sub, (*path, p)) for p, sub in reversed(node.subs.items()))
    return out


def _merge(entries: list[_Entry]) -> list[_Entry]:
    """Patterns for the entries: adjacent siblings as {a,b}, numbered siblings as runs, until nothing merges."""
    while True:
        n = len(entries)
        entries = _numbers(_alternatives(entries))
        if len(entries) == n:
            return entries


def _alternatives(entries: list[_Entry]) -> list[_Entry]:
    """Runs of adjacent entries that differ in one name (not a number): one entry with {a,b,...} there."""
    out: list[_Entry] = []
    i = 0
    while i < len(entries):
        e, best = entries[i], (1, -1)
        for pos, t in enumerate(e.tokens):
            if not isinstance(t, str) or t.isdigit():
                continue
            k = 1
            while (k < SHOWN and i + k < len(entries) and _same_but(entries[i + k], e, pos)
                   and isinstance(entries[i + k].tokens[pos], str) and not entries[i + k].tokens[pos].isdigit()):
                k += 1
            if k > best[0]:
                best = (k, pos)
        k, pos = best
        if k == 1:
            out.append(e)
        else:
            run = entries[i:i + k]
            alt = _Alt(tuple(r.tokens[pos] for r in run))
            out.append(_Entry((*e.tokens[:pos], alt, *e.tokens[pos + 1:]), e.complete, sum(r.count for r in run)))
        i += k
    return out


def _same_but(a: _Entry, b: _Entry, pos: int) -> bool:
    return (a.complete == b.complete and len(a.tokens) == len(b.tokens)
            and a.tokens[:pos] == b.tokens[:pos] and a.tokens[pos + 1:] == b.tokens[pos + 1:])


def _numbers(entries: list[_Entry]) -> list[_Entry]:
    """Entries that differ in one number, anywhere in the list, as one entry with the numbers as runs, at the
    first one's place; the position that merges most goes first. Numbers that make more than `SHOWN`
    runs, or more runs than half the entries, stay apart (every other layer reads better by name)."""
    best: tuple[int, list[_Entry]] = (len(entries), entries)
    width = max((len(e.tokens) for e in entries), default=0)
    for pos in range(width):
        by: dict[tuple, list[int]] = {}
        for i, e in enumerate(entries):
            t = e.tokens[pos] if pos < len(e.tokens) else None
            if isinstance(t, str) and t.isdigit() and str(int(t)) == t:
                by.setdefault((len(e.tokens), e.complete, e.tokens[:pos], e.tokens[pos + 1:]), []).append(i)
        merged: dict[int, _Entry] = {}
        gone: set[int] = set()
        for idx in by.values():
            nums = sorted(int(entries[i].tokens[pos]) for i in idx)
            spans = _spans(nums)
            if len(idx) < 2 or len(spans) > SHOWN or 2 * len(spans) > len(idx) or len(set(nums)) < len(nums):
                continue
            e = entries[idx[0]]
            merged[idx[0]] = _Entry((*e.tokens[:pos], _Numbers(tuple(spans)), *e.tokens[pos + 1:]), e.complete,
                                    sum(entries[i].count for i in idx))
            gone.update(idx[1:])
        out = [merged.get(i, e) for i, e in enumerate(entries) if i not in gone]
        if len(out) < best[0]:
            best = (len(out), out)
    return best[1]


def _spans(nums: Sequence[int]) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    for x in nums:
        if spans and x == spans[-1][1] + 1:
            spans[-1] = (spans[-1][0], x)
        else:
            spans.append((x, x))
    return spans


def _words(e: _Entry, trie: Optional[_Trie]) -> str:
    """One entry as words: "{w1,w2}.weight of all 32 mlp.experts of model.layers from 10 to 14 (5 of 40)"."""
    if not e.tokens:
        return f"all {e.count} tensors"
    pieces: list[str] = []  # outermost first
    text: list[str] = []
    for pos, t in enumerate(e.tokens):
        if isinstance(t, _Numbers):
            siblings = trie.at(e.tokens[:pos]) if trie is not None else None
            c = siblings.numbered() if siblings is not None else 0
            where = ".".join(text)
            if c and t.spans == ((0, c - 1),):
                pieces.append(f"all {c} {where}")
            else:
                pieces.append(f"{where} {t.text()}" + (f" ({t.count()} of {c})" if c else ""))
            text = []
        else:
            text.append(t if isinstance(t, str) else "{" + ",".join(t.options) + "}")
    if text:
        tail = ".".join(text)
        if e.complete:
            node = trie.at(e.tokens) if trie is not None else None
            c = node.numbered() if node is not None else 0
            if _numeric(tail):  # "all 3 0" would read as a count: the tensors of module '0'
                tail = f"all {e.count} tensors of {_quote(tail)}"
            else:
                tail = f"all {c} {tail}" if c else f"all {e.count} tensors of {tail}"
        elif not pieces and all(isinstance(t, str) for t in e.tokens):
            tail = _quote(tail)
        pieces.append(tail)
    elif e.complete and not pieces[-1].startswith("all "):
        pieces[-1] = f"all {e.count} tensors of {pieces[-1]}"
    return " of ".join(reversed(pieces))  # the innermost first: "w1 of experts from 0 to 31 of ..."
