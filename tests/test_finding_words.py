"""A finding that names hundreds of tensors names their groups first, the tensors on demand (issue 24
point 6): the words (`layer_groups.describe`) on a mixture-of-experts and a dense transformer's names,
compared with sentences built here from how the names were made; then a run of 4,040 tensors written
through `summary.EventWriter`, whose finding reads the same in `tb-diag report` and in a real
TensorBoard's `/findings`, and whose tensors the tab lists when its disclosure opens (Chromium)."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from test_browser import Tab, _all_plugins

from tb_diag_plugin import report
from tb_diag_plugin.findings.context import layer_list
from tb_diag_plugin.layer_groups import describe
from tb_diag_plugin.summary import EventWriter
from tbserver import serve

LAYERS, EXPERTS, PROJ = 40, 32, ("w1", "w2", "w3")


def moe_names(layers: int = LAYERS, experts: int = EXPERTS) -> list[str]:
    """A mixture-of-experts model's parameters in model order: per layer 4 attention projections, the
    router, then every expert's three projections."""
    out = []
    for i in range(layers):
        out += [f"model.layers.{i}.self_attn.{p}_proj.weight" for p in "qkvo"] + [f"model.layers.{i}.mlp.gate.weight"]
        out += [f"model.layers.{i}.mlp.experts.{e}.{w}.weight" for e in range(experts) for w in PROJ]
    return out


BLOCKS = 48
DENSE_PARTS = ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")


def dense_names() -> list[str]:
    """A GPT-2-shaped transformer's parameters in model order."""
    return (["transformer.wte.weight", "transformer.wpe.weight"]
            + [f"transformer.h.{b}.{p}.{t}" for b in range(BLOCKS) for p in DENSE_PARTS for t in ("weight", "bias")]
            + ["transformer.ln_f.weight", "transformer.ln_f.bias"])


def _block(name: str, prefix: str) -> int:
    return int(name[len(prefix):].split(".")[0])


# ---------------------------------------------------------------- the words
def test_experts_of_some_layers_are_named_as_the_experts_of_those_layers():
    names = moe_names()
    lo, hi = 10, 14
    chosen = [n for n in names if ".experts." in n and lo <= _block(n, "model.layers.") <= hi]
    assert len(chosen) == (hi - lo + 1) * EXPERTS * len(PROJ)
    assert describe(chosen, names) == (f"all {EXPERTS} mlp.experts of model.layers from {lo} to {hi} "
                                       f"({hi - lo + 1} of {LAYERS})")
    # Without the other tensors nothing can be called "all": the names are compressed, still exact.
    assert describe(chosen) == (f"{{{','.join(PROJ)}}}.weight of mlp.experts from 0 to {EXPERTS - 1} "
                                f"of model.layers from {lo} to {hi}")
    # One projection of every expert of every layer.
    w1 = [n for n in names if n.endswith(".w1.weight")]
    assert describe(w1, names) == f"w1.weight of all {EXPERTS} mlp.experts of all {LAYERS} model.layers"
    # A stray tensor outside the groups is named as it is, in model order.
    stray = "model.layers.20.mlp.experts.3.w2.weight"
    assert describe(chosen + ["model.layers.2.mlp.gate.weight", stray], names) == (
        f"'model.layers.2.mlp.gate.weight'; all {EXPERTS} mlp.experts of model.layers from {lo} to {hi} "
        f"({hi - lo + 1} of {LAYERS}); '{stray}'")


def test_blocks_of_a_dense_transformer_are_named_as_runs_of_blocks():
    names = dense_names()
    runs = [(3, 9), (20, 24)]
    chosen = [n for n in names if n.startswith("transformer.h.")
              and any(a <= _block(n, "transformer.h.") <= b for a, b in runs)]
    count = sum(b - a + 1 for a, b in runs)
    assert len(chosen) == count * len(DENSE_PARTS) * 2
    assert describe(chosen, names) == (f"all {len(chosen)} tensors of transformer.h from 3 to 9 and from 20 to 24 "
                                       f"({count} of {BLOCKS})")
    qkv = [n for n in names if n.endswith("attn.c_attn.weight")]
    assert describe(qkv, names) == f"attn.c_attn.weight of all {BLOCKS} transformer.h"
    assert describe(qkv) == f"attn.c_attn.weight of transformer.h from 0 to {BLOCKS - 1}"
    assert describe(names, names) == f"all {len(names)} tensors of transformer"
    assert describe(names, ["lm_head.weight", *names]) == f"all {len(names)} tensors of transformer"
    # More groups than are shown: the first four, then the count.
    words = describe(names)
    assert words.startswith("transformer.{wte,wpe}.weight; ln_1.{weight,bias} of transformer.h from 0 to 47; ")
    assert words.endswith(f"; ... ({len(names)} in all)") and words.count(";") == 4


def test_short_lists_and_lists_without_groups_read_as_before():
    assert describe(["b.weight", "a.weight", "b.weight"]) == "'b.weight', 'a.weight'"
    assert layer_list(["1", "3", "1"]) == "'1', '3'"
    every_other = [f"{i}.weight" for i in range(0, 40, 2)]
    assert layer_list(every_other) == "'0.weight', '2.weight', '4.weight', '6.weight', ... (20 in all)"
    assert describe(every_other[:3], shown=2) == "'0.weight', '2.weight', ... (3 in all)"
    with pytest.raises(ValueError, match="shown"):
        describe(every_other, shown=0)
    # An nn.Sequential's Linear layers (every other module): groups of two tensors each would be no
    # shorter than the names, so the names are quoted; numbered modules in group words are quoted too.
    seq = [f"{i}.{w}" for i in range(0, 40, 2) for w in ("weight", "bias")]
    assert describe(seq[:15], seq) == "'0.weight', '0.bias', '2.weight', '2.bias', ... (15 in all)"
    blocks = [f"{i}.{j}.{w}" for i in range(0, 8, 2) for j in range(3) for w in ("weight", "bias")]
    assert describe(blocks[:18], blocks) == "all 6 tensors of '0'; all 6 tensors of '2'; all 6 tensors of '4'"


# ---------------------------------------------------------------- through the report and a real server
LO, HI = 10, 14  # the layers whose experts get no gradient to speak of
RUN = "moe"


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
    """4,040 tensors over 30 logged steps; the experts of layers LO..HI get gradients 1e7x smaller."""
    d = tmp_path_factory.mktemp("words")
    names = moe_names()
    starved = [n for n in names if ".experts." in n and LO <= _block(n, "model.layers.") <= HI]
    rng = np.random.default_rng(0)
    with EventWriter(str(d / RUN)) as w:
        for step in range(0, 300, 10):
            g = rng.uniform(0.5, 1.5, len(names)).astype(np.float32)
            g[[names.index(n) for n in starved]] *= np.float32(1e-7)
            w.write_vectors(step, [("grad_norm", names, (), g)])
    return d, starved


def _report_layers(text: str) -> dict[str, str]:
    """kind -> the words after "Layers:" in the text report (its wrapped lines joined again)."""
    out, kind, words = {}, None, None
    for line in text.splitlines():
        head = re.match(r"  (ERROR|WARNING|INFO)\s+(\w+) \(", line)
        if head:
            kind, words = head.group(2), None
        elif line.startswith("    Layers: "):
            words = line[len("    Layers: "):]
            out[kind] = words
        elif words is not None and line.startswith("    ") and not line.startswith("    Try: "):
            words += " " + line.strip()
            out[kind] = words
        else:
            words = None
    return out


@pytest.fixture(scope="module")
def moe_server(moe_run):
    with serve(str(moe_run[0]), plugins=_all_plugins()) as srv:
        srv.wait_for_runs(1)
        yield srv


def test_report_and_findings_route_name_the_same_groups(moe_run, moe_server):
    logdir, starved = moe_run
    text, doc = io.StringIO(), io.StringIO()
    assert report.run(str(logdir), as_json=False, fail_on=None, out=text) == 0
    report.run(str(logdir), as_json=True, fail_on=None, out=doc)
    answer = moe_server.plugin(f"findings?run={RUN}")
    route = {f["kind"]: (f, words) for f, words in zip(answer["findings"], answer["layers_text"], strict=True)}
    found, words = route["vanishing_gradient"]
    # Grouped words, the complete list of tensors beside them (the tab marks each).
    assert words == f"all {EXPERTS} mlp.experts of model.layers from {LO} to {HI} ({HI - LO + 1} of {LAYERS})"
    assert sorted(found["layers"]) == sorted(starved)
    # The same words in the text report and the route, for every finding of the run; the same findings in
    # --json, every tensor listed.
    assert _report_layers(text.getvalue()) == {kind: w for kind, (_, w) in route.items()}
    assert json.loads(doc.getvalue()) == answer["findings"]
    # The message itself names the groups too, in the same words, never a list of 480 names.
    assert f"{len(starved)} tensor(s) ({words}) get gradients" in found["message"]


def test_the_tab_shows_the_words_and_the_tensors_on_demand(browser, moe_server, moe_run):
    _, starved = moe_run
    answer = moe_server.plugin(f"findings?run={RUN}")
    found, words = next((f, w) for f, w in zip(answer["findings"], answer["layers_text"])
                        if f["kind"] == "vanishing_gradient")
    context = browser.new_context(viewport={"width": 1440, "height": 1000})
    page = context.new_page()
    try:
        tab = Tab(page, moe_server)
        item = tab.frame.locator('.finding[data-kind="vanishing_gradient"]')
        item.wait_for()
        assert f"layers: {words}" in item.locator(".finding-detail").inner_text()
        summary = item.locator(".finding-tensors summary")
        assert summary.inner_text() == f"show {len(starved)} tensors"
        assert item.locator(".finding-tensors li").count() == 0  # listed only when asked for
        summary.click()
        item.locator(".finding-tensors li").nth(len(starved) - 1).wait_for()  # the list is built on the click
        listed = item.locator(".finding-tensors li").all_inner_texts()
        assert listed == found["layers"] and sorted(listed) == sorted(starved)
        tab.assert_clean()
    finally:
        context.close()
