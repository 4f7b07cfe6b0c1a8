"""The `/findings` answer's `stopped` field: when and why `stop_on=` stopped training (issue 23).

The logger records a stop as the `stopped` metric (contract: `metadata.STOPPED`) at the step it
stopped, valued the severity rank `stop_on` named; why is the findings at or above that severity
that had begun by then, from the same rules as the rest of the answer.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional, Sequence

from tb_diag_plugin import metadata

if TYPE_CHECKING:  # the findings package loads when the first findings are asked for, not at start-up
    from tb_diag_plugin.findings import Finding, Series


def describe(series: Optional[Series], found: Sequence[Finding]) -> Optional[dict]:
    """{"step", "stop_on", "kinds"} of the run's latest stop, or None when it was not stopped."""
    if series is None or not series.steps.size or not series.layers:
        return None
    step = int(series.steps[-1])
    rank = series.values[-1, 0]
    if not math.isfinite(rank) or not 0 <= int(rank) < len(metadata.SEVERITIES):
        return None
    stop_on = metadata.SEVERITIES[int(rank)]
    kinds = [f.kind for f in found if metadata.SEVERITY_RANK[f.severity] <= int(rank) and f.first_step <= step]
    return {"step": step, "stop_on": stop_on, "kinds": list(dict.fromkeys(kinds))}
