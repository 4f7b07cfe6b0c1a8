// Above the findings: a run that tb-diag's stop_on= stopped, when and why (the /findings answer's
// `stopped` field, issue 23). One note per stopped run; nothing for the others.
import {message} from "../dom.js";

export function stoppedNotes(runs, results) {
  const notes = [];
  runs.forEach((r, k) => {
    const stop = results[k] instanceof Error ? null : results[k]?.stopped;
    if (!stop) return;
    const why = stop.kinds?.length ? `: ${stop.kinds.join(", ")}` : "";
    const note = message(`Training of “${r.run}” was stopped by tb-diag at step ${stop.step} ` +
                         `(stop_on="${stop.stop_on}")${why}.`, "error");
    note.classList.add("run-stopped");
    note.dataset.run = r.run;
    note.dataset.step = String(stop.step);
    notes.push(note);
  });
  return notes;
}
