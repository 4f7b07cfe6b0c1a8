"""The findings package as data: importable without TensorBoard, rules declared and ordered by dependency."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from tb_diag_plugin import metadata
from tb_diag_plugin.findings import KINDS, RULES, Series, analyze, registry
from tb_diag_plugin.findings.context import Rule

RULES_DIR = pathlib.Path(registry.__file__).parent / "rules"

_NO_TENSORBOARD = """
import sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "tensorboard" or name.startswith("tensorboard.") or name == "torch":
            raise ImportError("blocked: " + name)

sys.meta_path.insert(0, Block())
import numpy as np
from tb_diag_plugin.findings import Series, analyze
steps = np.arange(20, dtype=np.int64)
loss = np.linspace(2.0, 1.0, 20, dtype=np.float32)[:, None]
loss[12, 0] = np.nan
s = Series("loss", ["total"], [""], steps, loss, np.ones(loss.shape, dtype=bool))
found, _ = analyze({"loss": s})
print(found[0].kind, found[0].first_step)
assert not any(m == "tensorboard" or m.startswith("tensorboard.") for m in sys.modules)
"""


def test_findings_import_and_run_without_tensorboard():
    proc = subprocess.run([sys.executable, "-c", _NO_TENSORBOARD], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["nonfinite", "12"]


def test_blocking_tensorboard_really_blocks():
    # The check above means something only if the block stops a real TensorBoard import.
    code = _NO_TENSORBOARD.split("import numpy")[0] + "import tensorboard.compat.proto.summary_pb2\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "blocked: tensorboard" in proc.stderr


def test_registered_rules_run_after_what_they_depend_on():
    pos = {r.name: i for i, r in enumerate(registry.ORDER)}
    assert set(pos) == {r.name for r in registry.RULES}
    for r in registry.ORDER:
        assert all(pos[d] < pos[r.name] for d in r.after), r.name
    # Every rule but `nonfinite` reads values before the NaN cutoff, which `nonfinite` sets.
    assert all("nonfinite" in r.after for r in registry.ORDER if r.name != "nonfinite")


def _noop(ctx) -> None:
    pass


def test_registry_orders_by_dependency_keeping_the_listed_order_otherwise():
    a = Rule("a", ("loss_spike",), ("loss",), _noop, after=("c",))
    b = Rule("b", ("loss_spike",), ("loss",), _noop)
    c = Rule("c", ("nonfinite",), ("loss",), _noop)
    assert [r.name for r in registry.ordered([a, b, c])] == ["b", "c", "a"]


@pytest.mark.parametrize(
    "rules, message",
    [
        ([Rule("a", ("loss_spike",), ("loss",), _noop, after=("ghost",))], "not registered"),
        ([Rule("a", ("loss_spike",), ("loss",), _noop, after=("b",)),
          Rule("b", ("loss_spike",), ("loss",), _noop, after=("a",))], "cycle"),
        ([Rule("a", ("no_such_kind",), ("loss",), _noop)], "not in the contract"),
        ([Rule("a", ("loss_spike",), ("no_such_metric",), _noop)], "not in the contract"),
        ([Rule("a", ("loss_spike",), ("loss",), _noop), Rule("a", ("loss_spike",), ("loss",), _noop)], "two rules"),
    ],
)
def test_registry_refuses_a_bad_declaration(rules, message):
    with pytest.raises(ValueError, match=message):
        registry.ordered(rules)


def _literal_metrics(tree: ast.AST) -> set[str]:
    """Metric names a module reads: ctx.series.get("m") and ctx.get(kind, "m", ...)."""
    out = set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"):
            continue
        args = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        owner = node.func.value
        if isinstance(owner, ast.Attribute) and owner.attr == "series":
            out.update(args[:1])
        elif isinstance(owner, ast.Name) and owner.id == "ctx":
            out.update(args[1:])
    return out


def test_every_metric_a_rule_module_reads_is_declared_and_in_the_contract():
    declared_by_module: dict[str, set[str]] = {}
    for r in registry.RULES:
        declared_by_module.setdefault(r.check.__module__.rsplit(".", 1)[1], set()).update(r.metrics)
    for path in sorted(RULES_DIR.glob("*.py")):
        if path.stem == "__init__":
            continue
        read = _literal_metrics(ast.parse(path.read_text()))
        assert read, path  # the parse found the reads
        assert read <= declared_by_module[path.stem], (path.stem, read - declared_by_module[path.stem])
        assert read <= set(metadata.METRICS)


def test_kinds_are_the_registered_kinds_in_contract_order():
    reported = {k for r in registry.RULES for k in r.kinds}
    assert set(KINDS) == reported
    assert list(KINDS) == [k for k in metadata.FINDING_KINDS if k in reported]


def test_a_new_rule_is_one_declaration_and_a_registry_entry():
    def flat_loss(ctx) -> None:
        ctx.add("underfitting", "info", ["total"], 0, 0, "flat", "try more")

    extra = Rule("flat_loss", ("underfitting",), ("loss",), flat_loss, after=("nonfinite",))
    steps = np.arange(10, dtype=np.int64)
    v = np.ones((10, 1), dtype=np.float32)
    series = {"loss": Series("loss", ["total"], [""], steps, v, np.ones(v.shape, dtype=bool))}
    assert "underfitting" not in [f.kind for f in analyze(series)[0]]
    assert "underfitting" in [f.kind for f in analyze(series, rules=RULES + (extra,))[0]]


def test_rule_modules_share_helpers_through_context_not_each_other():
    # One module (context.py) holds what rules share, under public names; a rule module imports no other
    # rule module and no private name.
    for path in sorted(RULES_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tb_diag_plugin"):
                assert not node.module.startswith("tb_diag_plugin.findings.rules"), (path.stem, node.module)
                assert not [a.name for a in node.names if a.name.startswith("_")], (path.stem, node.module)


def test_severities_and_causes_are_checked_at_registration():
    with pytest.raises(ValueError, match="not in the contract"):
        registry.ordered([Rule("a", ("loss_spike",), ("loss",), _noop, severities=("critical",))])
    with pytest.raises(ValueError, match="not in the contract"):
        registry.ordered([Rule("a", ("loss_spike",), ("loss",), _noop, consequence_of=("ghost",))])
    for r in registry.ORDER:
        assert set(r.severities) <= set(metadata.SEVERITIES) and set(r.consequence_of) <= set(metadata.FINDING_KINDS)
