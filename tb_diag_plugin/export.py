"""`tb-diag export`: every recorded value as rows ``run, metric, layer, step, value``.

CSV (with a header) or JSON Lines (one object per line). Values are the
float32 numbers of the event files, written so that parsing them gives back
exactly those numbers (``repr`` of the float); NaN and infinities are
``nan``/``inf``/``-inf`` in CSV and ``NaN``/``Infinity``/``-Infinity`` in
JSON Lines, which pandas (`read_csv`, `read_json(lines=True)`) and
Python's `csv`/`json` modules read as floats. Whole-model metrics have an
empty layer (pandas reads an empty CSV field as NaN unless given
``keep_default_na=False``). Rows come run by run, metric by metric, then in
step order, layers in the order the logger recorded them. Only values that
were recorded are exported (a layer absent at a step gives no row).
"""

from __future__ import annotations

import csv
import json
import os
import sys
from typing import Iterator, Optional, TextIO

FORMATS = ("csv", "jsonl")
COLUMNS = ("run", "metric", "layer", "step", "value")


def rows(logdir: str, run: Optional[str] = None) -> Iterator[tuple[str, str, str, int, float]]:
    """Every recorded value of `logdir` (or of its run `run`) as (run, metric, layer, step, value).

    Raises KeyError when `run` is given and has no diagnostics.
    """
    from tb_diag_plugin.reading import LocalReader

    reader = LocalReader(logdir)
    runs = reader.runs()
    if run is not None:
        if run not in runs:
            raise KeyError(run)
        runs = [run]
    for r in runs:
        series = reader.series(r)
        for metric in sorted(series):
            s = series[metric]
            for i, step in enumerate(s.steps.tolist()):
                for j, layer in enumerate(s.layers):
                    if s.present[i, j]:
                        yield r, metric, layer, int(step), float(s.values[i, j])


def export(logdir: str, run: Optional[str], fmt: str, out: TextIO) -> int:
    """Write every recorded value of `logdir` to `out` as CSV or JSON Lines; return an exit status.

    0 on success (also for a logdir without diagnostics: a CSV then holds
    only its header), 2 for an unknown format, a missing directory or an
    unknown `run` (with a message on stderr).
    """
    if fmt not in FORMATS:
        print(f"tb-diag export: unknown format {fmt!r} (use one of: {', '.join(FORMATS)})", file=sys.stderr)
        return 2
    if not os.path.isdir(logdir):
        print(f"tb-diag export: no such directory: {logdir}", file=sys.stderr)
        return 2
    data = rows(logdir, run)
    try:
        first = next(data, None)
    except KeyError:
        print(f"tb-diag export: no run {run!r} with diagnostics in {logdir}", file=sys.stderr)
        return 2
    try:
        if fmt == "csv":
            writer = csv.writer(out, lineterminator="\n")
            writer.writerow(COLUMNS)
            if first is not None:
                writer.writerow(_csv_row(first))
                for row in data:
                    writer.writerow(_csv_row(row))
        else:
            if first is not None:
                out.write(_json_row(first))
                for row in data:
                    out.write(_json_row(row))
        out.flush()
    except BrokenPipeError:  # `tb-diag export ... | head`: the reader has what it wanted
        _silence_stdout(out)
    return 0


def _csv_row(row: tuple[str, str, str, int, float]) -> tuple[str, str, str, int, str]:
    r, metric, layer, step, value = row
    return r, metric, layer, step, repr(value)  # repr: nan, inf, -inf, and exact round trips


def _json_row(row: tuple[str, str, str, int, float]) -> str:
    return json.dumps(dict(zip(COLUMNS, row)), ensure_ascii=False) + "\n"


def _silence_stdout(out: TextIO) -> None:
    """After a broken pipe, point stdout at /dev/null so the interpreter's final flush stays quiet."""
    if out is sys.stdout:
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
