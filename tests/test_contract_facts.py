"""Facts with one owner (the contract, `tb_diag_plugin/metadata.py`): the loss's total layer, the activation
kinds, the structure document's version and shape, the site-name grammar, and one way to a run's findings."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tb_diag_plugin import metadata
from tb_diag_plugin.summary import EventWriter
from tbserver import serve, until


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = nn.ReLU()

    def forward(self, x):
        x = F.relu(self.fc(x))  # "blk.relu()"
        x = F.relu(x - 0.1)  # "blk.relu()#2"
        return torch.sigmoid(self.act(x))  # the module "blk.act", then "blk.sigmoid()"


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blk = _Block()
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.blk(x)))  # "tanh()" at the root


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A few logged steps of `_Net`; returns (logdir, its series, its structure document)."""
    from tb_diag_logger import Diagnostics
    from tb_diag_plugin.reading import LocalReader

    d = tmp_path_factory.mktemp("facts")
    torch.manual_seed(0)
    model = _Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 4)
    with Diagnostics(model, logdir=str(d / "run"), every=1, optimizer=opt) as diag:
        for step in range(3):
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            diag.step(step, loss=loss, losses={"l2": loss.detach() * 0})
            opt.step()
        diag.evaluate(3, loss=1.0)
    reader = LocalReader(str(d))
    return d, reader.series("run"), reader.structure("run")


def test_the_loggers_sites_follow_the_contracts_grammar(logged):
    """Every site the logger recorded is named by `metadata.site_name` and parses back, with the contract's
    pattern, to the module the structure document files it under."""
    _, series, doc = logged
    sites = series["act_mean"].layers
    assert set(sites) == {"blk.relu()", "blk.relu()#2", "blk.act", "blk.sigmoid()", "tanh()"}
    module_of_site = {s["name"]: m["name"] for m in doc["modules"] for s in m["sites"]}
    assert set(module_of_site) == set(sites)
    for name in sites:
        assert metadata.site_module(name) == module_of_site[name], name
    assert metadata.site_name("blk", "relu", 2) == "blk.relu()#2" and metadata.site_name("", "tanh", 1) == "tanh()"
    assert metadata.site_name("blk.act", "relu", 0) == "blk.act"


def test_the_tab_parses_site_names_as_python_does(browser):
    """The tab reads the contract's pattern with JavaScript's regular expressions (metrics.js): on tricky
    names Chromium's engine finds the same module as Python's."""
    names = ["enc.relu()", "enc.relu()#12", "relu()", "a.b.c.gelu_()#2", "enc.act", "", "x.relu()#", "relu()\n",
             "weird.name().relu()", "0.1.sigmoid()"]
    page = browser.new_page()
    try:
        got = page.evaluate(
            "([p, names]) => names.map((n) => { const m = new RegExp(p).exec(n); return m ? (m[1] || '') : n; })",
            [metadata.SITE_NAME_PATTERN, names],
        )
    finally:
        page.close()
    assert got == [metadata.site_module(n) for n in names]
    assert got[:4] == ["enc", "enc", "", "a.b.c"] and got[4] == "enc.act"


def test_the_structure_document_is_the_contracts(logged):
    """Its version is the contract's, it passes the check the reader applies, and its sites' kinds are the
    contract's activation kinds."""
    _, _, doc = logged
    assert doc["version"] == metadata.STRUCTURE_VERSION
    assert metadata.check_structure(doc) is doc
    kinds = {s["name"]: s["kind"] for m in doc["modules"] for s in m["sites"]}
    assert kinds == {"blk.relu()": "relu", "blk.relu()#2": "relu", "blk.act": "relu", "blk.sigmoid()": "sigmoid",
                     "tanh()": "tanh"}
    assert set(kinds.values()) <= set(metadata.ACTIVATION_KINDS)


def test_the_total_loss_is_the_contracts_layer(logged):
    _, series, _ = logged
    assert series["loss"].layers == [metadata.TOTAL_LOSS, "l2"]
    assert series["val_loss"].layers == [metadata.TOTAL_LOSS]


@pytest.mark.parametrize("doc, words", [
    ([], "not an object"),
    ({"modules": []}, "no valid version"),
    ({"version": "1", "modules": []}, "no valid version"),
    ({"version": metadata.STRUCTURE_VERSION + 1, "modules": []}, "newer tb-diag"),
    ({"version": 1, "modules": None}, "no module list"),
    ({"version": 1, "modules": [{"name": "a"}]}, "no name and type"),
    ({"version": 1, "modules": [{"name": "a", "type": "T", "params": [1]}]}, "params is not a list"),
    ({"version": 1, "modules": [{"name": "a", "type": "T", "sites": [{"name": "a", "kind": "softplus"}]}]},
     "unknown kind 'softplus'"),
    ({"version": 1, "modules": [], "optimizer": "Adam"}, "optimizer"),
])
def test_a_structure_document_it_cannot_use_is_refused_by_name(doc, words):
    with pytest.raises(metadata.ContractError, match=words):
        metadata.check_structure(doc)
    with pytest.raises(metadata.ContractError, match=words):
        metadata.parse_structure(json.dumps(doc).encode())


def test_parse_structure_refuses_what_is_not_json():
    for blob, words in ((b"\xff", "not JSON"), (b"{", "not JSON"), (b"[" * 100_000, "RecursionError")):
        with pytest.raises(metadata.ContractError, match=words):
            metadata.parse_structure(blob)


def test_contract_route_carries_the_facts():
    body = metadata.contract_dict()
    assert body["total_loss"] == metadata.TOTAL_LOSS
    assert body["activation_kinds"] == list(metadata.ACTIVATION_KINDS)
    assert set(body["saturating_kinds"]) < set(body["activation_kinds"])
    assert set(body["dead_unit_kinds"]) < set(body["activation_kinds"])
    assert body["structure_version"] == metadata.STRUCTURE_VERSION
    assert body["site_name_pattern"] == metadata.SITE_NAME_PATTERN
    assert body["heatmap_max_rows"] == metadata.HEATMAP_MAX_ROWS


def test_the_tab_and_report_give_a_run_the_same_findings_and_notes(tmp_path, capsys):
    """`/findings` and `tb-diag report --json` on the same run: the same findings in the same order, and the
    same notes (the unusable structure document first, then the rules that could not run), in one order."""
    from tb_diag_plugin import report

    steps = 40
    with EventWriter(str(tmp_path / "run")) as w:
        w.write_structure(0, {"version": metadata.STRUCTURE_VERSION + 1, "modules": []})  # from a newer tb-diag
        for step in range(steps):
            loss = np.array([np.nan if step >= 30 else 1.0], np.float32)  # flat, then NaN
            w.write_vectors(step, [("loss", [metadata.TOTAL_LOSS], (), loss),
                                   ("grad_norm", ["a.weight", "a.bias"], (), np.array([1.0, 0.0], np.float32))])
    out = io.StringIO()
    report.run(str(tmp_path), as_json=True, fail_on=None, out=out)
    from_report = json.loads(out.getvalue())
    report_notes = [line.split(": ", 2)[2] for line in capsys.readouterr().err.splitlines()]
    with serve(str(tmp_path)) as srv:
        srv.wait_for_runs(1)
        until(lambda: srv.plugin("values?run=run&metric=loss&points=1000")["num_steps"] == steps)
        from_tab = srv.plugin("findings?run=run")
    assert from_tab["findings"] == from_report and from_report
    assert "nonfinite" in {f["kind"] for f in from_report}
    assert from_tab["skipped"] == report_notes
    assert "model structure unreadable" in report_notes[0] and "newer tb-diag" in report_notes[0]
    assert len(report_notes) > 1  # and the rules that could not run, after it
