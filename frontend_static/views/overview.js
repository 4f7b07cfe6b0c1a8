// Overview: the findings first (or, when they are unavailable, each run's
// headline figures), then small multiples of the headline signals.
import * as api from "../api.js";
import {el, clear, fmt, fmtPct, message} from "../dom.js";
import {FIXED_MARGINS, Panels, RUN_LEGEND, alpha, esc, layout, runLegend, seriesColor} from "../charts.js";
import {METRICS, OVERVIEW_METRICS, SEVERITY_RANK, TOTAL_LOSS, findingLayerKind, findingTarget, moduleOf} from "../metrics.js";
import {stoppedNotes} from "./stopped.js";

let findingsBox;
let showAll = false;
const FIRST_FINDINGS = 4;
let figuresBox;
let panels;
// The loss-component chart: one, for the run and the form chosen in its header.
let compRun = null;
let compMode = "share";

function init(root) {
  findingsBox = el("section", {class: "findings", "aria-label": "Findings"});
  figuresBox = el("section", {class: "figures", "aria-label": "Headline figures"});
  const grid = el("div", {class: "panels small-multiples"});
  root.append(findingsBox, figuresBox, el("h2", {class: "section-title"}, "Headline signals"), grid);
  panels = new Panels(grid);
}

function finite(arr) {
  return arr.map((y) => (y != null && Number.isFinite(y) ? y : null));
}

function lastFinite(arr) {
  for (let i = arr.length - 1; i >= 0; i--) if (arr[i] != null && Number.isFinite(arr[i])) return {i, v: arr[i]};
  return null;
}

async function load(r, points) {
  const want = OVERVIEW_METRICS.filter((m) => r.metrics.includes(m));
  const out = {};
  await Promise.all(want.map(async (m) => {
    try {
      // A per-tensor or per-site series is asked as one row (its layers' mean, min, max and NaN/Inf count
      // per step, layer_groups on the server): the overview's answer does not grow with the model.
      const perLayer = ["param", "site"].includes(METRICS[m]?.layer_kind);
      out[m] = await api.values(r.run, m, {points, maxRows: perLayer ? 1 : undefined});
    } catch (e) {
      out[m] = e;
    }
  }));
  return out;
}

// Mean over activation sites of the dead fraction, per row; null (unknown, never 0) where a
// site's value is NaN/Inf: its activations were not finite. The answer is one grouped row (the sites'
// mean of finite values, and their NaN/Inf count), or a row per site from a server without groups.
function deadShare(v) {
  const out = new Array(v.B).fill(null);
  for (let i = 0; i < v.B; i++) {
    let s = 0;
    let n = 0;
    let unknown = false;
    for (let j = 0; j < v.L; j++) {
      if (!v.has(i, j)) continue;
      const x = v.at(i, j);
      if (v.bad(i, j) || !Number.isFinite(x)) unknown = true;
      else {
        s += x;
        n++;
      }
    }
    out[i] = n && !unknown ? s / n : null;
  }
  return out;
}

function ok(v) {
  return v && !(v instanceof Error) && v.B > 0;
}

function headline(r, d) {
  const f = {run: r.run, steps: null, range: "", loss: null, lossMin: null, grad: null, gradMax: null, lr: null, dead: null, firstBad: null};
  const any = [d.loss, d.grad_norm_total, d.learning_rate, d.dead_fraction].find(ok);
  if (any) {
    f.steps = any.numSteps;
    f.range = `${any.firstStep}–${any.lastStep}`;
  }
  let firstBad = Infinity;
  const scanBad = (v, j) => {
    for (let i = 0; i < v.B; i++) if (v.has(i, j) && v.bad(i, j)) return v.stepFirst[i];
    return Infinity;
  };
  if (ok(d.loss)) {
    const j = Math.max(0, d.loss.layerIndex(TOTAL_LOSS));
    const col = d.loss.column(j);
    f.loss = lastFinite(col)?.v ?? null;
    const mins = finite(d.loss.column(j, "min")).filter((x) => x != null);
    f.lossMin = mins.length ? Math.min(...mins) : null;
    firstBad = Math.min(firstBad, scanBad(d.loss, j));
  }
  if (ok(d.grad_norm_total)) {
    const col = d.grad_norm_total.column(0);
    f.grad = lastFinite(col)?.v ?? null;
    const maxs = finite(d.grad_norm_total.column(0, "max")).filter((x) => x != null);
    f.gradMax = maxs.length ? Math.max(...maxs) : null;
    firstBad = Math.min(firstBad, scanBad(d.grad_norm_total, 0));
  }
  if (ok(d.learning_rate)) f.lr = lastFinite(d.learning_rate.column(0))?.v ?? null;
  if (ok(d.dead_fraction)) f.dead = deadShare(d.dead_fraction).at(-1);  // the last row: unknown stays unknown
  f.firstBad = Number.isFinite(firstBad) ? firstBad : null;
  return f;
}

function drawFigures(app, runs, figs) {
  clear(figuresBox);
  const cols = [
    ["steps", "Logged steps", (f) => (f.steps == null ? "–" : `${f.steps} (${f.range})`)],
    ["loss", "Loss (last)", (f) => fmt(f.loss)],
    ["lossMin", "Loss (lowest)", (f) => fmt(f.lossMin)],
    ["grad", "Total grad norm (last)", (f) => fmt(f.grad)],
    ["gradMax", "Total grad norm (max)", (f) => fmt(f.gradMax)],
    ["firstBad", "First NaN/Inf", (f) => (f.firstBad == null ? "none" : `step ${f.firstBad}`)],
    ["dead", "Dead units (last)", (f) => fmtPct(f.dead)],
    ["lr", "Learning rate (last)", (f) => fmt(f.lr)],
  ];
  const table = el("table", {class: "figures-table"},
    el("thead", {}, el("tr", {}, el("th", {}, "Run"), cols.map(([, h]) => el("th", {}, h)))),
    el("tbody", {}, figs.map((f) => el("tr", {dataset: {run: f.run}},
      el("td", {class: "run-cell"}, el("span", {class: "swatch", style: {background: app.runColor(f.run)}}), f.run),
      cols.map(([key, , show]) => el("td", {dataset: {key, value: f[key] == null ? "" : String(f[key])},
                                          class: key === "firstBad" && f.firstBad != null ? "bad" : ""}, show(f)))))));
  figuresBox.append(el("h2", {class: "section-title"}, "Headline figures"), el("div", {class: "table-wrap"}, table));
}

function drawFindings(app, runs, results) {
  clear(findingsBox);
  findingsBox.append(el("h2", {class: "section-title"}, "Findings"), ...stoppedNotes(runs, results));
  const items = [];
  const failed = [];
  const skipped = [];
  runs.forEach((r, k) => {
    const res = results[k];
    if (res instanceof Error) failed.push([r.run, res]);
    else {
      (res.findings || []).forEach((f, i) => items.push({...f, run: r.run, verdicts: res.layers || {}, words: res.layers_text?.[i]}));
      for (const s of res.skipped || []) skipped.push(`${r.run}: ${s}`);
    }
  });
  findingsBox.dataset.state = failed.length === runs.length ? "unavailable" : "ok";
  if (failed.length) {
    const why = failed[0][1].status ? `HTTP ${failed[0][1].status}` : failed[0][1].message;
    const who = failed.length === runs.length ? "" : ` for ${failed.map(([n]) => n).join(", ")}`;
    findingsBox.append(message(`Findings are not available${who} (${why}); the headline figures below summarise each run.`, "warn"));
  }
  if (failed.length === runs.length) return;
  items.sort((a, b) => (SEVERITY_RANK[a.severity] ?? 3) - (SEVERITY_RANK[b.severity] ?? 3));
  if (!items.length) {
    findingsBox.append(message("No problems found in the selected runs.", "ok"));
  }
  const list = el("ul", {class: "finding-list"});
  // The first few, and each run's worst (the first of its run: worst first), are always shown.
  const firstOfRun = new Set();
  const runsSeen = new Set();
  items.forEach((f, n) => {
    if (!runsSeen.has(f.run)) firstOfRun.add(n);
    runsSeen.add(f.run);
  });
  const shownFirst = (n) => n < FIRST_FINDINGS || firstOfRun.has(n);
  items.forEach((f, n) => {
    const layers = Array.isArray(f.layers) ? f.layers : [];
    const target = findingTarget(f.kind);
    const go = () => {
      // The finding's own layers, marked in its own run only.
      const patch = {view: target[0], marked: {run: f.run, layers}, layerRun: f.run};
      if (layers.length) patch.layer = moduleOf(layers[0], f.verdicts[layers[0]]?.layer_kind || findingLayerKind(f.kind));
      if (Number.isFinite(f.first_step) && target[0] !== "loss") patch.step = {lo: f.first_step, hi: f.first_step};
      app.openMetric(target[0], target[1], patch);
    };
    // The server's words for the layers (what `tb-diag report` prints); hundreds name their groups.
    const layerText = layers.length ? String(f.words ?? layers.join(", ")) : "";
    list.append(el("li", {class: `finding sev-${f.severity}`, hidden: !showAll && !shownFirst(n), dataset: {kind: f.kind, run: f.run}},
      el("button", {type: "button", class: "finding-link", onclick: go, title: "Show the chart"},
        el("span", {class: `sev sev-${f.severity}`}, f.severity),
        el("span", {class: "swatch", style: {background: app.runColor(f.run)}}),
        el("span", {class: "finding-run"}, f.run),
        el("span", {class: "finding-msg"}, String(f.message ?? f.kind))),
      el("div", {class: "finding-detail muted small"},
        f.first_step != null ? `steps ${f.first_step}–${f.last_step}` : "",
        layerText ? ` · layers: ${layerText}` : "",
        f.suggestion ? el("span", {class: "finding-suggestion"}, ` — ${f.suggestion}`) : null),
      tensorList(layers, layerText)));
  });
  findingsBox.append(list);
  const hiddenCount = items.filter((f, n) => !shownFirst(n)).length;
  if (hiddenCount) {
    findingsBox.append(el("button", {type: "button", class: "link more", onclick: () => {
      showAll = !showAll;
      app.render();
    }}, showAll ? "Show fewer findings" : `Show all ${items.length} findings (${hiddenCount} more)`));
  }
  if (skipped.length) findingsBox.append(el("details", {class: "muted small"}, el("summary", {}, `${skipped.length} check(s) skipped`),
    el("ul", {}, skipped.map((s) => el("li", {}, s)))));
}

// The tensors of a finding whose words name groups, on demand: listed when the disclosure opens.
function tensorList(layers, words) {
  if (layers.every((n) => words.includes(`'${n}'`))) return null;  // the words name each one already
  const box = el("details", {class: "finding-tensors muted small"}, el("summary", {}, `show ${layers.length} tensors`));
  box.addEventListener("toggle", () => {
    if (box.open && box.childElementCount === 1) box.append(el("ul", {}, layers.map((n) => el("li", {}, n))));
  });
  return box;
}

function lineTraces(app, runs, data, metric, pick) {
  const traces = [];
  runs.forEach((r, k) => {
    const v = data[k][metric];
    if (!ok(v)) return;
    const color = app.runColor(r.run);
    for (const [j, name, dash] of pick(v)) {
      const x = Array.from(v.stepFirst);
      if (v.binned && metric !== "dead_fraction") {
        traces.push({type: "scatter", mode: "lines", x, y: finite(v.column(j, "min")), line: {width: 0}, hoverinfo: "skip", meta: {run: r.run, role: "min"}});
        traces.push({type: "scatter", mode: "lines", x, y: finite(v.column(j, "max")), line: {width: 0}, fill: "tonexty",
                     fillcolor: alpha(color, 0.15), hoverinfo: "skip", meta: {run: r.run, role: "max"}});
      }
      const y = metric === "dead_fraction" ? deadShare(v).map((s) => (s == null ? null : 100 * s)) : finite(v.column(j));
      traces.push({type: "scatter", mode: v.B === 1 ? "markers" : "lines", x, y, name: esc(name ? `${r.run} · ${name}` : r.run),
                   line: {color, width: 1.6, dash: dash || "solid"}, marker: {color, size: 7},
                   meta: {run: r.run, role: "value", layer: name},
                   hovertemplate: `${esc(name ? `${r.run} · ${name}` : r.run)}<br>step %{x}<br>%{y:.4g}<extra></extra>`});
    }
  });
  return traces;
}

// Log scale when positive values span more than `ratio` (a diverging run
// would flatten every other run on a linear axis).
function autoLog(traces, ratio = 1e3) {
  let lo = Infinity;
  let hi = -Infinity;
  for (const tr of traces) {
    for (const y of tr.y) {
      if (y == null) continue;
      if (y <= 0) return false;
      lo = Math.min(lo, y);
      hi = Math.max(hi, y);
    }
  }
  return hi / lo > ratio;
}

function small(app, key, title, traces, {logY = false, yTitle = "", missing = "", range = undefined} = {}) {
  const t = app.theme();
  const p = panels.panel(key, title);
  if (!traces.length) return panels.notice(p, missing || "Not recorded in the selected runs.");
  if (logY === "auto") logY = autoLog(traces);
  runLegend(traces);
  panels.plot(p, traces, layout(t, {
    ...RUN_LEGEND,
    height: 250,
    ...FIXED_MARGINS,
    margin: {...FIXED_MARGINS.margin, l: yTitle ? 76 : FIXED_MARGINS.margin.l},
    uirevision: key,
    xaxis: {title: {text: "step"}, automargin: false},
    yaxis: {type: logY ? "log" : "linear", title: {text: yTitle}, exponentformat: "power", range, automargin: false},
  }), key);
}

// Per row, each component's |value| (or its share of their sum, in %) and the running sum the
// stacked areas are drawn to; a row where a component is absent or NaN/Inf is a gap (null) for
// every component: an unknown share is never drawn as 0 %.
function componentStack(v, comps, share) {
  const own = comps.map(() => new Array(v.B).fill(null));
  const top = comps.map(() => new Array(v.B).fill(null));
  for (let i = 0; i < v.B; i++) {
    const abs = comps.map(([, j]) => (v.has(i, j) && Number.isFinite(v.at(i, j)) ? Math.abs(v.at(i, j)) : null));
    if (abs.includes(null)) continue;
    const sum = abs.reduce((a, b) => a + b, 0);
    if (share && !(sum > 0)) continue;
    let acc = 0;
    abs.forEach((a, c) => {
      own[c][i] = share ? (100 * a) / sum : a;
      acc += own[c][i];
      top[c][i] = acc;
    });
  }
  return {own, top};
}

// One chart for the loss components of one run (chosen in its header), so the overview does
// not grow with the number of runs.
function components(app, runs, data) {
  const t = app.theme();
  const have = runs.filter((r, k) => ok(data[k].loss));
  const p = panels.panel("components", "Loss components");
  if (!have.length) return panels.notice(p, "No loss recorded: pass loss= to diag.step.");
  if (!have.some((r) => r.run === compRun)) {
    compRun = (have.find((r, k) => data[runs.indexOf(r)].loss.layers.filter((n) => n !== TOTAL_LOSS).length > 1) || have[0]).run;
  }
  const runSel = el("select", {"aria-label": "Run of the loss components", class: "comp-run", onchange: (e) => {
    compRun = e.target.value;
    app.render();
  }}, have.map((r) => el("option", {value: r.run, selected: r.run === compRun}, r.run)));
  const modeSel = el("select", {"aria-label": "Loss components as", class: "comp-mode", onchange: (e) => {
    compMode = e.target.value;
    app.render();
  }}, el("option", {value: "share", selected: compMode === "share"}, "share of their sum"),
      el("option", {value: "stack", selected: compMode === "stack"}, "stacked |loss|"));
  clear(p.head).append(el("h3", {}, "Loss components"),
                       el("span", {class: "swatch", style: {background: app.runColor(compRun)}}), runSel, modeSel);
  p.box.dataset.run = compRun;
  p.box.dataset.mode = compMode;
  const r = have.find((x) => x.run === compRun);
  const v = data[runs.indexOf(r)].loss;
  const comps = v.layers.map((n, j) => [n, j]).filter(([n]) => n !== TOTAL_LOSS);
  if (comps.length < 2) return panels.notice(p, `“${r.run}” records ${comps.length ? "one component" : "no components"}: pass losses={"ce": ..., "l2": ...} to see how they add up.`);
  const share = compMode === "share";
  const x = Array.from(v.stepFirst);
  const {own, top} = componentStack(v, comps, share);
  const traces = comps.map(([n], c) => ({
    type: "scatter", mode: "lines", x, y: top[c], customdata: own[c], connectgaps: false, name: esc(n),
    fill: c === 0 ? "tozeroy" : "tonexty", line: {width: 0.8, color: seriesColor(c)}, fillcolor: alpha(seriesColor(c), 0.55),
    meta: {run: r.run, component: n},
    hovertemplate: `${esc(n)}<br>step %{x}<br>${share ? "%{customdata:.1f} %" : "%{customdata:.4g}"}<extra></extra>`,
  }));
  const gaps = own[0].filter((y, i) => y == null && v.has(i, comps[0][1])).length;
  if (gaps) p.note.append(el("span", {class: "muted small"}, `${gaps} logged step${gaps > 1 ? "s" : ""} with a NaN/Inf component left blank`));
  const logY = !share && autoLog(traces);
  panels.plot(p, traces, layout(t, {
    height: 250, margin: {...FIXED_MARGINS.margin, l: 76}, showlegend: true,
    legend: {orientation: "h", x: 0, y: 1.02, yanchor: "bottom", font: {size: 11}}, uirevision: `components|${compRun}|${compMode}`,
    xaxis: {title: {text: "step"}, automargin: false},
    yaxis: {title: {text: share ? "% of sum" : "|loss|"}, range: share ? [0, 100] : undefined, exponentformat: "power",
            type: logY ? "log" : "linear", automargin: false},
  }), `components_${compRun}`);
}

async function render(app, ctx) {
  const runs = app.selectedRuns();
  panels.begin();
  if (!runs.length) {
    clear(findingsBox).append(message("Select one or more runs on the left.", "info"));
    findingsBox.dataset.runs = "";
    clear(figuresBox);
    return panels.end();
  }
  const points = 400;
  const data = await Promise.all(runs.map((r) => load(r, points)));
  if (ctx.stale()) return;
  // Findings read every metric of a run (seconds, the first time, on a 20k-step x 500-layer
  // run): asked for once the charts' data is in, so they do not compete, and drawn when
  // they come; until then the previous findings for the same runs stay, or a note says why.
  const pending = Promise.all(runs.map((r) => api.findings(r.run).catch((e) => e)));
  const which = runs.map((r) => r.run).join("\n");
  if (findingsBox.dataset.runs !== which) {
    clear(findingsBox).append(el("h2", {class: "section-title"}, "Findings"),
                              message("Analysing the selected runs…", "info"));
    findingsBox.dataset.state = "loading";
  }
  drawFigures(app, runs, runs.map((r, k) => headline(r, data[k])));

  small(app, "grad_norm_total", "Total gradient norm",
        lineTraces(app, runs, data, "grad_norm_total", () => [[0, "", ""]]),
        {logY: true, missing: "No grad_norm_total recorded."});
  small(app, "loss_total", "Loss",
        lineTraces(app, runs, data, "loss", (v) => [[Math.max(0, v.layerIndex(TOTAL_LOSS)), "", ""]]),
        {logY: "auto", missing: "No loss recorded: pass loss= to diag.step."});
  small(app, "learning_rate", "Learning rate",
        lineTraces(app, runs, data, "learning_rate", (v) => v.layers.map((n, j) => [j, v.L > 1 ? n : "", ["solid", "dash", "dot", "dashdot"][j % 4]])),
        {logY: true, missing: "No learning_rate recorded: pass optimizer= to Diagnostics."});
  small(app, "dead_share", "Share of dead units (mean over ReLU sites)",
        lineTraces(app, runs, data, "dead_fraction", () => [[0, "", ""]]),
        {yTitle: "%", range: [0, 100], missing: "No dead_fraction recorded (no ReLU-family activations)."});
  components(app, runs, data);
  panels.end();
  const results = await pending;
  if (ctx.stale()) return;
  drawFindings(app, runs, results);
  findingsBox.dataset.runs = which;
}

export default {id: "overview", title: "Overview", init, render};
