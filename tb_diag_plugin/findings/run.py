"""A run's findings as the tab (`serving.store`) and `tb-diag report` both give them: one function, one order."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

from tb_diag_plugin import layer_groups
from tb_diag_plugin.findings import analyze, layer_verdicts
from tb_diag_plugin.findings.context import Finding, recorded_with
from tb_diag_plugin.findings.model_info import read_model
from tb_diag_plugin.series import Series


@dataclass
class RunFindings:
    """One run's findings, worst first, and its notes: what made the advice general (the structure
    document), then the rules that could not run."""

    run: str
    findings: list[Finding]
    notes: list[str]
    layers_text: list[str] = field(default_factory=list)  # per finding, its layers in words (`layer_words`)

    def answer(self, layers: Mapping[str, Sequence[str]]) -> dict:
        """The `/findings` answer (`layers`: metric -> its layer names, for the per-layer verdicts);
        `layers_text[i]` is what the report prints for `findings[i]`'s layers."""
        return {"run": self.run, "findings": [f.to_dict(self.run) for f in self.findings],
                "layers_text": list(self.layers_text), "skipped": self.notes,
                "layers": layer_verdicts(self.findings, layers)}


def layer_words(found: Sequence[Finding], series: Mapping[str, Series]) -> list[str]:
    """Each finding's layers as the report and the tab print them: a few names as they are, hundreds as
    the groups they make ("all 32 mlp.experts of layers from 10 to 14 (5 of 40)"), "all" judged against
    the layers of the metrics that record every one of them."""
    return [layer_groups.describe(f.layers, recorded_with(f.layers, series.values())) for f in found]


def analyze_run(run: str, series: Mapping[str, Series],
                read_structure: Callable[[], Optional[Mapping[str, Any]]]) -> RunFindings:
    """The findings of one run from its series (at least `findings.INPUTS` of what it recorded) and a
    reader of its structure document (None without one).

    An unreadable document costs only the advice that fits the model, and a
    rule that fails costs only this run's findings: each becomes a note.
    """
    model, notes = read_model(read_structure)
    try:
        found, skipped = analyze(dict(series), model=model)
    except Exception as e:  # a bug of ours on this data: the run's other answers and the other runs go on
        found, skipped = [], [f"could not analyse this run: {type(e).__name__}: {e}"]
    return RunFindings(run, found, notes + skipped, layer_words(found, series))
