"""Layers grouped along the module tree (issue 24 point 1): the tree, the levels a view shows, the
groups' mean/min/max/non-finite counts compared with numpy over the ungrouped values, and the same
through a real TensorBoard server's /values, with /versions for live polls (point 3)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from tb_diag_plugin import layer_groups as lg
from tb_diag_plugin.reading import downsample
from tb_diag_plugin.summary import EventWriter
from tbserver import serve_with_plugin

BLOCKS, EXPERTS = 6, 8
# A mixture-of-experts model's parameters in model order: embedding, per block 8 experts x 2 tensors
# and an attention weight, the head.
LAYERS = (["embed.weight"]
          + [f"model.layers.{b}.{p}" for b in range(BLOCKS)
             for p in [f"mlp.experts.{e}.{t}" for e in range(EXPERTS) for t in ("weight", "bias")] + ["attn.q.weight"]]
          + ["lm_head.weight"])


def _keys(view):
    return [LAYERS[r] if isinstance(r, int) else r.key for r in view]


def test_tree_levels_blocks_then_layers_then_tensors():
    root = lg.build(LAYERS, "param")
    assert _keys(lg.rows(root, 5)) == ["embed.weight", "model.layers", "lm_head.weight"]
    blocks = lg.rows(root, 10)
    assert _keys(blocks) == ["embed.weight"] + [f"model.layers.{b}" for b in range(BLOCKS)] + ["lm_head.weight"]
    # single-child chains are merged: a block shows its experts' module and its one attention tensor
    inner = _keys(lg.rows(root, 20))
    assert inner[1:3] == ["model.layers.0.mlp.experts", "model.layers.0.attn.q.weight"]
    assert len(lg.rows(root, len(LAYERS))) == len(LAYERS)
    # every layer is in exactly one row, at every level
    for n in (1, 5, 10, 20, 60, 200):
        members = sorted(j for r in lg.rows(root, n) for j in ([r] if isinstance(r, int) else r.members))
        assert members == list(range(len(LAYERS)))


def test_expand_and_reveal():
    root = lg.build(LAYERS, "param")
    view = _keys(lg.rows(root, 5, expand=["model.layers.2"]))
    # the hidden ancestor opens too, and only the asked group shows its children
    assert view == (["embed.weight", "model.layers.0", "model.layers.1", "model.layers.2.mlp.experts",
                     "model.layers.2.attn.q.weight"] + [f"model.layers.{b}" for b in range(3, BLOCKS)]
                    + ["lm_head.weight"])
    target = LAYERS.index("model.layers.4.mlp.experts.3.bias")
    revealed = lg.rows(root, 5, reveal=[target])
    assert target in revealed and len(revealed) < len(LAYERS)
    with pytest.raises(ValueError, match="no group"):
        lg.rows(root, 5, expand=["nope"])


def test_revealed_layers_get_rows_while_the_view_fits_the_screen():
    """A finding's layers spread over many blocks: each gets a row of its own while the view stays within
    max_rows (the first one always); the others stay inside groups of the view (which the tab marks)."""
    flat = [f"blocks.{b}.{t}" for b in range(640) for t in ("weight", "bias")]  # 10 ranges of 64 blocks
    root = lg.build(flat, "param")
    top = lg.rows(root, 12)
    assert len(top) == 10
    spread = [flat.index(f"blocks.{b}.weight") for b in (3, 5, 70, 200, 330, 600)]
    view = lg.rows(root, 80, reveal=spread, reveal_rows=80)
    rows = [r for r in view if isinstance(r, int)]
    # blocks 3 and 5 are in the first range (64 blocks, 73 rows with the other nine ranges) and open into
    # their two tensors; opening another range would pass 80 rows
    assert rows == [spread[0], spread[0] + 1, spread[1], spread[1] + 1] and len(view) == 75
    inside = {j: next(r for r in view if isinstance(r, lg.Group) and j in r.members) for j in spread[2:]}
    assert [g.key for g in inside.values()] == ["blocks[64:128]", "blocks[192:256]", "blocks[320:384]",
                                                 "blocks[576:640]"]
    # every layer still in exactly one row
    assert sorted(j for r in view for j in ([r] if isinstance(r, int) else r.members)) == list(range(len(flat)))
    # room for all of them: each gets its row; the first one always does
    assert set(spread) <= set(lg.rows(root, 80, reveal=spread, reveal_rows=1000))
    assert spread[3] in lg.rows(root, 5, reveal=[spread[3], spread[0]], reveal_rows=5)
    assert spread[0] not in lg.rows(root, 5, reveal=[spread[3], spread[0]], reveal_rows=5)
    # without a bound (the model view keeps its own), every one
    assert set(spread) <= set(lg.rows(root, 80, reveal=spread))
    # an explicit expand is always honoured
    assert len(lg.rows(root, 12, expand=["blocks[0:64]", "blocks[64:128]"])) > 12


def test_wide_flat_model_splits_into_ranges():
    flat = [f"{i}.weight" for i in range(5000)]
    root = lg.build(flat, "param")
    top = lg.rows(root, 100)
    assert len(top) <= 100 and all(isinstance(r, lg.Group) and len(r.children) <= lg.FANOUT for r in top)
    assert top[0].key == "[0:64]" and top[0].label == "0.weight … 63.weight"
    assert sum(len(r.members) for r in top) == 5000


def test_sites_hang_on_their_module():
    sites = ["enc.0.relu()", "enc.0.relu()#2", "enc.1.gelu()", "dec.act", "dec.act2"]
    root = lg.build(sites, "site")
    assert _keys_of(sites, lg.rows(root, 2)) == ["enc", "dec"]
    assert _keys_of(sites, lg.rows(root, 4)) == ["enc.0", "enc.1.gelu()", "dec.act", "dec.act2"]


def _keys_of(layers, view):
    return [layers[r] if isinstance(r, int) else r.key for r in view]


def _raw(S=53, seed=1):
    rng = np.random.default_rng(seed)
    values = rng.lognormal(-3, 1, (S, len(LAYERS))).astype(np.float32)
    present = rng.random(values.shape) > 0.05
    values[rng.random(values.shape) < 0.01] = np.nan
    values[rng.random(values.shape) < 0.005] = np.inf
    values[7, LAYERS.index("model.layers.3.mlp.experts.5.weight")] = 1e6  # one tensor's spike
    return np.arange(S) * 10, values, present


def _expected(values, present, k, members):
    """Per bin of k rows: mean/min/max of the finite present values of `members`, counts."""
    out = []
    for a in range(0, values.shape[0], k):
        cell = values[a:a + k][:, members]
        here = present[a:a + k][:, members]
        good = here & np.isfinite(cell)
        fin = cell[good].astype(np.float64)
        out.append((fin.mean() if fin.size else np.nan, fin.min() if fin.size else np.nan,
                    fin.max() if fin.size else np.nan, int((here & ~np.isfinite(cell)).sum()), int(here.sum())))
    return np.array(out)


@pytest.mark.parametrize("points", [10, 1000], ids=["binned", "raw_steps"])
def test_aggregate_matches_numpy_over_the_ungrouped_values(points):
    steps, values, present = _raw()
    b = downsample.bin_steps(steps, values, present, points)
    k = -(-steps.size // points) if b.binned else 1
    view = lg.rows(lg.build(LAYERS, "param"), 20)
    agg = lg.aggregate(b.mean, b.min, b.max, b.nonfinite, b.present, view)
    for c, row in enumerate(view):
        if isinstance(row, int):
            continue
        want = _expected(values, present, k, row.members)
        np.testing.assert_allclose(agg.mean[:, c], want[:, 0], rtol=1e-5)
        np.testing.assert_allclose(agg.min[:, c], want[:, 1], rtol=1e-6)
        np.testing.assert_allclose(agg.max[:, c], want[:, 2], rtol=1e-6)
        np.testing.assert_array_equal(agg.nonfinite[:, c], want[:, 3])
        np.testing.assert_array_equal(agg.present[:, c], want[:, 4])
    # the spike is the max of its group, never averaged away
    spiked = next(c for c, r in enumerate(view) if not isinstance(r, int) and r.key == "model.layers.3.mlp.experts")
    assert agg.max[7 // k, spiked] == np.float32(1e6)


@pytest.mark.parametrize("with_nan", [False, True], ids=["no_nan", "a_nan"])
@pytest.mark.parametrize("batch", [1024, 3], ids=["one_batch", "batches_of_3"])
def test_a_summary_s_compact_counts_aggregate_to_the_same_numbers_as_full_ones(with_nan, batch, monkeypatch):
    """A step summary keeps `present` as one count per bin (broadcast over the tensors) and its non-finite
    counts as uint16; a batch of groups with no NaN/Inf is then reduced without masks (`_uniform`). Every cell
    must equal the general computation on the same counts as full float32 matrices (`_reduce`), and the numpy
    reference; with batches of any size (groups gathered together, or one at a time)."""
    monkeypatch.setattr(lg, "BATCH", batch)
    rng = np.random.default_rng(3)
    B, L, k = 40, len(LAYERS), 5
    mean = rng.lognormal(-3, 1, (B, L)).astype(np.float32)
    mn, mx = mean * np.float32(0.5), mean * np.float32(2)
    nonfinite = np.zeros((B, L), np.uint16)
    bad = LAYERS.index("model.layers.3.mlp.experts.5.weight")
    nonfinite[9, bad] = 2 if with_nan else 0  # a NaN/Inf in one group: its batch takes the general path
    count = np.full(B, k, np.float32)
    count[-1] = 3  # the last bin holds fewer steps
    count[4] = 0  # and a bin with no step at all, whatever its cells hold
    mean[4], mn[4], mx[4] = 7, 6, 8
    present = np.broadcast_to(count[:, None], (B, L))
    view = lg.rows(lg.build(LAYERS, "param"), 20)
    assert any(isinstance(r, lg.Group) and bad in r.members for r in view)
    compact = lg.aggregate(mean, mn, mx, nonfinite, present, view)
    full = lg.aggregate(mean, mn, mx, nonfinite.astype(np.float32), np.ascontiguousarray(present), view)
    for a, b in zip((compact.mean, compact.min, compact.max, compact.nonfinite, compact.present),
                    (full.mean, full.min, full.max, full.nonfinite, full.present)):
        np.testing.assert_array_equal(a, b)
    for c, row in enumerate(view):
        if isinstance(row, int):  # a layer's own column is passed through as it is
            continue
        cols = list(row.members)
        w = present[:, cols] - nonfinite[:, cols]
        with np.errstate(invalid="ignore"):
            want = np.where(w.sum(1) > 0, np.sum(np.where(w > 0, mean[:, cols], 0) * w, 1) / w.sum(1), np.nan)
        np.testing.assert_allclose(compact.mean[:, c], want, rtol=1e-5)
        np.testing.assert_array_equal(compact.present[:, c], present[:, cols].sum(1))
        np.testing.assert_array_equal(np.isnan(compact.max[:, c]), w.sum(1) == 0)


def test_describe_names_groups_first():
    names = [n for n in LAYERS if ".mlp.experts." in n and n.split(".")[2] in "1234"]
    names += ["model.layers.5.mlp.experts.0.bias", "lm_head.weight"]
    assert lg.describe(names, LAYERS) == (f"all {EXPERTS} mlp.experts of model.layers from 1 to 4 (4 of {BLOCKS}); "
                                          "'model.layers.5.mlp.experts.0.bias'; 'lm_head.weight'")


# ------------------------------------------------------------- through a real server
def _decode(body: bytes):
    h = struct.unpack("<I", body[:4])[0]
    header = json.loads(body[4:4 + h])
    arrays = {}
    for a in header["arrays"]:
        n = int(np.prod(a["shape"]))
        arrays[a["name"]] = np.frombuffer(body, a["dtype"], n, 4 + h + a["offset"]).reshape(a["shape"])
    return header, arrays


@pytest.fixture(scope="module")
def grouped_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("groups")
    steps, values, present = _raw(S=40, seed=3)
    # Each layer set is a tag of its own; every step writes every layer here, so the model order is LAYERS'
    # (absent cells are covered by the tests above).
    present[:] = True
    with EventWriter(str(d / "moe")) as w:
        for i, s in enumerate(steps):
            cols = np.flatnonzero(present[i])
            w.write_vectors(int(s), [("grad_norm", [LAYERS[j] for j in cols], (), values[i, cols])])
    return d, steps, values, present


@pytest.fixture(scope="module")
def served(grouped_run):
    with serve_with_plugin(str(grouped_run[0])) as (srv, plugin):
        srv.wait_for_runs(1)
        yield srv, plugin


@pytest.fixture(scope="module")
def group_server(served):
    return served[0]


def test_values_route_groups_rows(group_server, grouped_run):
    _, steps, values, present = grouped_run
    status, body, _ = group_server.get("data/plugin/diagnostics/values?run=moe&metric=grad_norm&points=8"
                                       "&max_rows=10&format=f32")
    assert status == 200
    header, arrays = _decode(body)
    assert header["grouped"] and header["num_layers"] == len(LAYERS)
    assert header["layers"] == ["embed.weight"] + [f"model.layers.{b}" for b in range(BLOCKS)] + ["lm_head.weight"]
    assert [g and g["members"] for g in header["groups"]] == [None] + [2 * EXPERTS + 1] * BLOCKS + [None]
    k = -(-steps.size // 8)
    for c, name in enumerate(header["layers"]):
        members = [j for j, n in enumerate(LAYERS) if n == name or n.startswith(name + ".")]
        want = _expected(values, present, k, members)
        np.testing.assert_allclose(arrays["mean"][:, c], want[:, 0], rtol=1e-5)
        np.testing.assert_allclose(arrays["max"][:, c], want[:, 2], rtol=1e-6)
        np.testing.assert_array_equal(arrays["nonfinite"][:, c], want[:, 3])
        np.testing.assert_array_equal(arrays["present"][:, c], want[:, 4])
    # a group's children on request; an unknown group is a 404, expand without max_rows a 400
    expanded = group_server.plugin("values?run=moe&metric=grad_norm&points=8&max_rows=10&expand=model.layers.1")
    assert "model.layers.1.mlp.experts" in expanded["layers"] and "model.layers.1" not in expanded["layers"]
    assert len(expanded["min"]) == len(expanded["values"])
    # its other groups' rows come from the first answer's (kept per group), its new ones are computed: all
    # equal to numpy over the ungrouped values
    for c, name in enumerate(expanded["layers"]):
        members = [j for j, n in enumerate(LAYERS) if n == name or n.startswith(name + ".")]
        want = _expected(values, present, k, members)
        for got, w in ((expanded["values"], want[:, 0]), (expanded["min"], want[:, 1]), (expanded["max"], want[:, 2])):
            np.testing.assert_allclose([float(row[c]) for row in got], w, rtol=1e-5)
        np.testing.assert_array_equal([row[c] for row in expanded["nonfinite"]], want[:, 3])
    assert group_server.get("data/plugin/diagnostics/values?run=moe&metric=grad_norm&max_rows=10&expand=x")[0] == 404
    assert group_server.get("data/plugin/diagnostics/values?run=moe&metric=grad_norm&expand=model.layers.1")[0] == 400
    assert group_server.get("data/plugin/diagnostics/values?run=moe&metric=grad_norm&max_rows=10&reveal=x")[0] == 404
    # a revealed layer is a row of its own, exactly its ungrouped values
    target = "model.layers.4.mlp.experts.3.bias"
    shown = group_server.plugin(f"values?run=moe&metric=grad_norm&points=8&max_rows=10&reveal={target}")
    plain = group_server.plugin(f"values?run=moe&metric=grad_norm&points=8&layer={target}")
    j = shown["layers"].index(target)
    got = np.array([np.nan if row[j] is None else float(row[j]) for row in shown["values"]])
    want = np.array([np.nan if row[0] is None else float(row[0]) for row in plain["values"]])
    np.testing.assert_allclose(got, want, rtol=1e-6)  # float32 sums of a bin, added in another order
    assert len(shown["layers"]) < len(LAYERS)
    assert all("revealed" not in g for g in shown["groups"] if g)
    # layers in three blocks, room for one more row: the first gets its rows, the other two stay in their
    # blocks, which say how many they hold
    asked = ["model.layers.1.mlp.experts.0.bias", "model.layers.3.attn.q.weight", "model.layers.3.mlp.experts.2.bias",
             "model.layers.5.mlp.experts.7.weight"]
    q = "&".join(f"reveal={n}" for n in asked)
    few = group_server.plugin(f"values?run=moe&metric=grad_norm&points=8&max_rows=10&{q}")
    assert asked[0] in few["layers"] and not set(asked[1:]) & set(few["layers"])
    held = {name: g["revealed"] for name, g in zip(few["layers"], few["groups"]) if g and "revealed" in g}
    assert held == {"model.layers.3": 2, "model.layers.5": 1}


def test_versions_name_the_data_a_view_holds(group_server):
    # the live poll compares these with the versions its views were fetched at: unchanged, nothing refetched
    versions = group_server.plugin("versions?run=moe")
    again = group_server.plugin("versions?run=moe")
    assert versions == again and set(versions["metrics"]) == {"grad_norm"}
    status, body, _ = group_server.get("data/plugin/diagnostics/values?run=moe&metric=grad_norm&points=4&format=f32")
    assert _decode(body)[0]["data_version"] == versions["metrics"]["grad_norm"]
    assert group_server.get("data/plugin/diagnostics/versions")[0] == 400
    assert group_server.get("data/plugin/diagnostics/versions?run=nope")[0] == 404


def test_opening_a_group_regroups_without_binning_again(served):
    server, plugin = served
    base = "data/plugin/diagnostics/values?run=moe&metric=grad_norm&points=7&max_rows=10&format=f32"
    before = len(plugin.store.binned)
    first = _decode(server.get(base)[1])[0]
    # Binned once, or answered from the run's step summary (reading.stepbins) without binning at all.
    after = len(plugin.store.binned)
    assert after in (before, before + 1)
    rows = plugin.store.group_rows

    def mine():  # this request's entries: (the key of its bins, points second; a group's key)
        return [key for key in rows.keys() if key[0][1] == 7]

    held = {key: rows.peek(key) for key in mine()}
    groups = {n for n, g in zip(first["layers"], first["groups"]) if g}
    assert {key[1] for key in held} == groups  # each group's row, kept
    opened = _decode(server.get(base + "&expand=model.layers.0")[1])[0]
    assert len(plugin.store.binned) == after  # the same binned columns, grouped otherwise
    assert opened["layers"] != first["layers"]
    # the groups it shows again are taken as they were; only the opened group's children were aggregated
    new = {key[1] for key in mine()} - groups
    assert new == {n for n, g in zip(opened["layers"], opened["groups"]) if g} - groups and new
    assert all(rows.peek(key) is value for key, value in held.items())
