"""`tb-diag report LOGDIR [--json] [--fail-on LEVEL]`: the findings of every run.

Text for people (per run, worst first, then the rules that could not run)
or, with --json, a JSON list of finding objects (`Finding.to_dict`); in JSON
mode the notes on rules that could not run go to stderr so that stdout
stays machine-readable. The exit status serves CI gates: 1 when a finding
at or above `fail_on` exists, else 0.
"""

from __future__ import annotations

import json
import sys
import textwrap
from typing import Optional, TextIO

from tb_diag_plugin import findings, metadata, reading
from tb_diag_plugin.findings.run import RunFindings, analyze_run

FAIL_LEVELS = metadata.SEVERITIES[::-1]  # the least severe first, as --help lists them


def run(logdir: str, as_json: bool, fail_on: Optional[str], out: TextIO) -> int:
    """Write the findings of every run under `logdir` to `out`; return the exit status.

    Args:
        logdir: a TensorBoard log directory (runs are its subdirectories with event files).
        as_json: a JSON list of finding objects instead of text.
        fail_on: None, or "info"/"warning"/"error": return 1 when a finding at or
            above this severity exists.
        out: where the report goes (notes in JSON mode go to stderr).
    """
    if fail_on is not None and fail_on not in FAIL_LEVELS:
        raise ValueError(f"fail_on must be one of {FAIL_LEVELS} or None, got {fail_on!r}")
    reader = reading.LocalReader(logdir)
    results = []  # (run, findings, notes): what could not be read first, then the findings' notes
    for name in reader.runs():
        problems = list(reader.index[name].problems)
        try:
            series = reader.series(name)
        except Exception as e:  # one unreadable run must not hide the others
            results.append((name, RunFindings(name, [], []), problems + [f"could not read this run: "
                                                                           f"{type(e).__name__}: {e}"]))
            continue
        result = analyze_run(name, series, lambda run=name: reader.structure(run))
        results.append((name, result, problems + result.notes))

    if as_json:
        doc = [f.to_dict(name) for name, result, _ in results for f in result.findings]
        json.dump(doc, out, indent=2, allow_nan=False)
        out.write("\n")
        for name, _, notes in results:
            for note in notes:
                print(f"tb-diag report: {name}: {note}", file=sys.stderr)
    else:
        _write_text(logdir, results, out)

    if fail_on is None:
        return 0
    limit = findings.SEVERITY_RANK[fail_on]
    failing = any(findings.SEVERITY_RANK[f.severity] <= limit for _, result, _ in results for f in result.findings)
    return 1 if failing else 0


def _write_text(logdir: str, results, out: TextIO) -> None:
    if not results:
        out.write(f"No runs with diagnostics under {logdir}.\n"
                  "Record some with tb_diag_logger.Diagnostics(model, writer, optimizer=opt).\n")
        return
    total = {s: 0 for s in findings.SEVERITIES}
    for name, result, notes in results:
        found = result.findings
        for f in found:
            total[f.severity] += 1
        counts = ", ".join(f"{n} {s}" for s in findings.SEVERITIES if (n := sum(f.severity == s for f in found)))
        out.write(f"== {name}: {counts or 'no findings'}\n")
        for f, words in zip(found, result.layers_text):
            steps = f"step {f.first_step}" if f.first_step == f.last_step else f"steps {f.first_step}-{f.last_step}"
            out.write(f"  {f.severity.upper():<7} {f.kind} ({steps})\n")
            out.write(_wrap(f.message, "    "))
            out.write(_wrap("Try: " + f.suggestion, "    "))
            out.write(_wrap("Layers: " + words, "    "))  # the tab's words too (`/findings` layers_text)
        if notes:
            out.write("  not checked / problems:\n")
            for note in notes:
                out.write(_wrap(note, "    - ", cont="      "))
        out.write("\n")
    summary = ", ".join(f"{n} {s}" for s, n in total.items() if n) or "no findings"
    out.write(f"{len(results)} run(s): {summary}.\n")


def _wrap(text: str, indent: str, cont: Optional[str] = None) -> str:
    lines = textwrap.wrap(text, width=100, initial_indent=indent, subsequent_indent=cont or indent,
                          break_on_hyphens=False)
    return "".join(line + "\n" for line in lines)
