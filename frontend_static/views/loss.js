// Loss: the total and each component over steps, runs overlaid; the
// per-sample spread where it was recorded; non-finite steps marked, and the
// spikes that the findings report (their `loss_spike` findings' steps: one
// detector, the server's rules, so the chart and the findings agree).
import * as api from "../api.js";
import {el} from "../dom.js";
import {FIXED_MARGINS, NONFINITE, Panels, RUN_LEGEND, alpha, esc, layout, nonfiniteAxisOf, runLegend} from "../charts.js";
import {PERCENTILES, TOTAL_LOSS} from "../metrics.js";

let panels;
let scaleSel;
let scaleMode = "auto";

function init(root, app) {
  scaleSel = el("select", {"aria-label": "Y scale", onchange: (e) => {
    scaleMode = e.target.value;
    app.render();
  }}, el("option", {value: "auto"}, "auto"), el("option", {value: "linear"}, "linear"), el("option", {value: "log"}, "log"));
  root.append(
    el("div", {class: "toolbar"}, el("label", {class: "tool"}, "Y scale ", scaleSel),
       el("span", {class: "legend-chip"}, el("span", {class: "chip-ring"}), "spike (a loss_spike finding)"),
       el("span", {class: "legend-chip"}, el("span", {class: "chip-box", style: {background: NONFINITE}}), "non-finite loss")),
    el("p", {class: "intro muted"}, "The total loss and each named component, runs overlaid. Bands show the spread " +
       "over the samples of the logged batch where it was recorded (5–95 % and 25–75 %), or the min–max of " +
       "each bin of steps when a long run is downsampled."));
  const grid = el("div", {class: "panels"});
  root.append(grid);
  panels = new Panels(grid);
}

function band(x, lo, hi, color, a, name, meta) {
  return [
    {type: "scatter", mode: "lines", x, y: lo, line: {width: 0, color}, hoverinfo: "skip", showlegend: false, meta},
    {type: "scatter", mode: "lines", x, y: hi, line: {width: 0, color}, fill: "tonexty", fillcolor: alpha(color, a),
     name, hoverinfo: "skip", showlegend: false, meta},
  ];
}

async function render(app, ctx) {
  const runs = app.selectedRuns();
  panels.begin();
  if (!runs.length) {
    panels.notice(panels.panel("none", "Loss", {wide: true}), "Select one or more runs on the left.");
    return panels.end();
  }
  const width = Math.max(300, (panels.root.clientWidth || 900) / 2 - 80);
  const points = Math.max(40, Math.min(2000, Math.round(width)));
  // The runs' findings (their loss_spike steps), asked beside the values: when they are in first (the
  // overview asked for them), the charts are drawn once, with the spikes.
  let found = null;
  const findings = Promise.all(runs.map((r) => (r.metrics.includes("loss") ? api.findings(r.run).catch(() => null) : null)));
  findings.then((f) => {
    found = f;
  });
  const loaded = await Promise.all(runs.map(async (r) => {
    if (!r.metrics.includes("loss")) return null;
    try {
      const v = await api.values(r.run, "loss", {points});
      const pct = {};
      await Promise.all(PERCENTILES.filter((m) => r.metrics.includes(m)).map(async (m) => {
        pct[m] = await api.values(r.run, m, {points});
      }));
      // Validation loss from diag.evaluate(), drawn over the training total.
      const val = r.metrics.includes("val_loss") ? await api.values(r.run, "val_loss", {points}) : null;
      return {v, pct, val};
    } catch (e) {
      return e;
    }
  }));
  if (ctx.stale()) return;
  // Drawn at once; the spike marks are added when the runs' findings come, if they were not in already.
  draw(app, runs, loaded, found);
  if (found) return;
  const later = await findings;
  if (ctx.stale()) return;
  draw(app, runs, loaded, later);
}

// Steps of the `loss_spike` findings of one run, per loss component they name.
function spikeSteps(answer) {
  const out = new Map();
  for (const f of answer?.findings || []) {
    if (f.kind !== "loss_spike" || !Array.isArray(f.steps)) continue;
    for (const n of f.layers || []) out.set(n, [...(out.get(n) || []), ...f.steps]);
  }
  return out;
}

// `found`: each run's /findings answer (null where unavailable), or null while they are pending.
function draw(app, runs, loaded, found) {
  const t = app.theme();
  panels.begin();
  const components = [];
  for (const d of loaded) {
    if (!d || d instanceof Error) continue;
    for (const n of d.v.layers) if (!components.includes(n)) components.push(n);
  }
  const problems = [];
  runs.forEach((r, k) => {
    const d = loaded[k];
    if (d == null) problems.push(`“${r.run}” recorded no loss (pass loss= or losses= to diag.step)`);
    else if (d instanceof Error) problems.push(`could not load the loss of “${r.run}”: ${d.message}`);
  });
  if (problems.length) {
    const p = panels.panel("problems", "Missing", {wide: true});
    panels.notice(p, problems.join("; ") + ".");
  }
  components.sort((a, b) => (a === TOTAL_LOSS ? -1 : b === TOTAL_LOSS ? 1 : 0));
  for (const c of components) {
    const p = panels.panel("loss:" + c, c === TOTAL_LOSS ? "Total loss" : [el("h3", {}, "Loss component: ", el("q", {}, c))], {wide: components.length === 1});
    p.box.dataset.component = c;
    const traces = [];
    const notes = [];
    let allPositive = true;
    let lo = Infinity;
    let hi = -Infinity;
    runs.forEach((r, k) => {
      const d = loaded[k];
      if (!d || d instanceof Error) return;
      const j = d.v.layerIndex(c);
      if (j < 0) return;
      const v = d.v;
      const color = app.runColor(r.run);
      const x = Array.from(v.stepFirst);
      const meta = {run: r.run, component: c};
      const pj = (m) => (d.pct[m] ? d.pct[m].layerIndex(c) : -1);
      if (pj("loss_p05") >= 0 && pj("loss_p95") >= 0) {
        const col = (m) => d.pct[m].column(pj(m)).map((y) => (Number.isFinite(y) ? y : null));
        traces.push(...band(Array.from(d.pct.loss_p05.stepFirst), col("loss_p05"), col("loss_p95"), color, 0.12, "5–95 %", {...meta, role: "p05-p95"}));
        if (pj("loss_p25") >= 0 && pj("loss_p75") >= 0) {
          traces.push(...band(Array.from(d.pct.loss_p25.stepFirst), col("loss_p25"), col("loss_p75"), color, 0.24, "25–75 %", {...meta, role: "p25-p75"}));
        }
        if (!notes.includes("spread")) notes.push("spread");
      } else if (v.binned) {
        const mn = v.column(j, "min").map((y) => (Number.isFinite(y) ? y : null));
        const mx = v.column(j, "max").map((y) => (Number.isFinite(y) ? y : null));
        traces.push(...band(x, mn, mx, color, 0.18, "min–max", {...meta, role: "min-max"}));
      }
      const ys = v.column(j);
      const finite = ys.map((y) => (y != null && Number.isFinite(y) ? y : null));
      for (const y of finite) {
        if (y == null) continue;
        if (y <= 0) allPositive = false;
        lo = Math.min(lo, y);
        hi = Math.max(hi, y);
      }
      traces.push({type: "scatter", mode: v.B === 1 ? "markers" : "lines", name: esc(r.run), x, y: finite,
                   line: {color, width: 1.6}, marker: {color, size: 7}, meta: {...meta, role: "value"},
                   hovertemplate: `${esc(r.run)}<br>step %{x}<br>${esc(c)} = %{y:.5g}<extra></extra>`});
      // A spike step inside a bin of steps is drawn at the bin's peak.
      const peak = v.binned ? v.column(j, "max").map((y) => (Number.isFinite(y) ? y : null)) : finite;
      const sp = (found ? spikeSteps(found[k]).get(c) || [] : []).map((s) => [s, v.rowOfStep(s)]).filter(([, i]) => i >= 0);
      if (found && found[k] == null && c === components[0]) notes.push(`${r.run}: findings not available, spikes not marked`);
      if (sp.length) {
        traces.push({type: "scatter", mode: "markers", name: "spike", x: sp.map(([s]) => s), y: sp.map(([, i]) => peak[i]),
                     marker: {symbol: "circle-open", size: 13, line: {width: 2.5}, color: t.fg}, meta: {...meta, role: "spike"},
                     hovertemplate: `${esc(r.run)}: loss spike at step %{x} (a finding)<br>${esc(c)} = %{y:.5g}<extra></extra>`});
        notes.push(`${r.run}: ${sp.length} spike${sp.length > 1 ? "s" : ""} (first at step ${sp[0][0]})`);
      }
      const badAt = [];
      for (let i = 0; i < v.B; i++) if (v.has(i, j) && v.bad(i, j)) badAt.push(i);
      if (badAt.length) {
        traces.push({type: "scatter", mode: "markers", name: "non-finite", x: badAt.map((i) => x[i]), y: badAt.map(() => 0.97),
                     yaxis: "y2", marker: {symbol: "x", size: 8, color: NONFINITE}, meta: {...meta, role: "nonfinite"},
                     hovertemplate: `${esc(r.run)}: loss is NaN/Inf at step %{x}<extra></extra>`});
        notes.push(`${r.run}: non-finite from step ${x[badAt[0]]}`);
      }
      if (v.numSteps === 1) notes.push(`${r.run}: a single logged step so far`);
      const vj = c === TOTAL_LOSS && d.val ? d.val.layerIndex(TOTAL_LOSS) : -1;
      if (vj >= 0) {
        const vy = d.val.column(vj).map((y) => (y != null && Number.isFinite(y) ? y : null));
        for (const y of vy) {
          if (y == null) continue;
          if (y <= 0) allPositive = false;
          lo = Math.min(lo, y);
          hi = Math.max(hi, y);
        }
        traces.push({type: "scatter", mode: "lines+markers", name: `${esc(r.run)} (validation)`, x: Array.from(d.val.stepFirst), y: vy,
                     line: {color, width: 1.6, dash: "dash"}, marker: {color, size: 6, symbol: "diamond"},
                     meta: {...meta, role: "validation"},
                     hovertemplate: `${esc(r.run)}<br>step %{x}<br>validation loss = %{y:.5g}<extra></extra>`});
        if (!notes.includes("validation")) notes.push("validation");
      }
    });
    const spreadNote = notes.includes("spread") ? ["bands: per-sample spread over the logged batch"] : [];
    if (notes.includes("validation")) spreadNote.push("dashed: validation loss (diag.evaluate)");
    const other = notes.filter((n) => n !== "spread" && n !== "validation");
    p.note.append(el("span", {class: "muted small"}, [...spreadNote, ...other].join(" · ")));
    if (!traces.some((tr) => tr.meta?.role === "value")) {
      panels.notice(p, "No run has this component.");
      continue;
    }
    const logY = scaleMode === "log" || (scaleMode === "auto" && allPositive && hi / lo > 100);
    runLegend(traces);
    panels.plot(p, traces, layout(t, {
      ...RUN_LEGEND,
      ...FIXED_MARGINS,
      height: 320,
      uirevision: `${c}|${scaleMode}`,
      xaxis: {title: {text: "step"}, automargin: false},
      yaxis: {type: logY ? "log" : "linear", exponentformat: "power", automargin: false},
      ...nonfiniteAxisOf(traces),
    }), `loss_${c}`);
  }
  if (!components.length && !problems.length) panels.notice(panels.panel("empty", "Loss", {wide: true}), "No loss recorded.");
  panels.end();
}

export default {id: "loss", title: "Loss", init, render};
