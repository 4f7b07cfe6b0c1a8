// Layer drill-down: every metric of one module (its parameters, its
// activation sites, its own output) over steps: of the run it was opened
// from (a model node, a finding, a heatmap cell), or the selected runs overlaid.
import * as api from "../api.js";
import {el, clear} from "../dom.js";
import {NONFINITE, Panels, RUN_LEGEND, alpha, axis, esc, layout, nonfiniteAxis, runLegend} from "../charts.js";
import {METRICS, MODULE_METRICS, PARAM_METRICS, SITE_METRICS, fetchMetric, isDerived, label, moduleOf, needsOf} from "../metrics.js";

let panels;
let picker;
let heading;

const DASHES = ["solid", "dash", "dot", "dashdot", "longdash"];
const DASH_TEXT = ["——", "– –", "···", "–·–", "— —"];

function init(root, app) {
  picker = el("select", {class: "layer-picker", "aria-label": "Layer", onfocus: fillPicker, onpointerdown: fillPicker, onkeydown: fillPicker,
                         onchange: (e) => app.select({layer: e.target.value, layerRun: app.state.layerRun})});
  heading = el("div", {class: "layer-heading"});
  root.append(el("div", {class: "toolbar"}, el("label", {class: "tool"}, "Layer ", picker)), heading);
  const grid = el("div", {class: "panels"});
  root.append(grid);
  panels = new Panels(grid);
}

async function render(app, ctx) {
  const t = app.theme();
  const selected = app.selectedRuns();
  // A layer opened from one run is that run's layer: the same name may be another module elsewhere.
  const only = selected.find((r) => r.run === app.state.layerRun);
  const runs = only ? [only] : selected;
  panels.begin();
  if (!runs.length) {
    clear(heading);
    panels.notice(panels.panel("none", "Layer", {wide: true}), "Select one or more runs on the left.");
    return panels.end();
  }
  const tagList = await Promise.all(runs.map((r) => api.tags(r.run).catch(() => null)));
  if (ctx.stale()) return;
  const {modules, members} = moduleIndex(runs, tagList);
  if (!modules.length) {
    clear(picker);
    pickerModules = [];
    clear(heading);
    panels.notice(panels.panel("none", "Layer", {wide: true}), "The selected runs record no per-layer metrics.");
    return panels.end();
  }
  let layer = app.state.layer;
  if (layer == null || !members.has(layer)) {
    const wanted = layer;
    layer = modules[0];
    if (wanted != null) {
      // a container module: show its first descendant that has series
      const child = modules.find((m) => wanted === "" || m.startsWith(wanted + "."));
      if (child != null) layer = child;
    }
  }
  showPicker(modules, layer);
  const mem = members.get(layer);
  // A site's type, per run where the runs differ ("1 (ReLU in a, b; Sigmoid in c)").
  const typeText = (s) => {
    const byType = mem.types.get(s);
    if (!byType) return s;
    if (byType.size === 1) return `${s} (${[...byType.keys()][0]})`;
    return `${s} (${[...byType].map(([ty, rs]) => `${ty} in ${rs.join(", ")}`).join("; ")})`;
  };
  clear(heading).append(...[
    el("h2", {class: "section-title"}, "Layer ", el("q", {}, layer === "" ? "(model)" : layer),
       only ? el("span", {class: "muted"}, " of ", el("span", {class: "swatch", style: {background: app.runColor(only.run)}}), only.run) : null),
    el("p", {class: "muted small"},
      mem.param.length ? `parameters: ${mem.param.join(", ")}` : "no tracked parameters",
      " · ",
      mem.site.length ? `activation sites: ${mem.site.map(typeText).join(", ")}` : "no activation sites"),
    only && selected.length > 1
      ? el("button", {type: "button", class: "btn compare", onclick: () => app.select({layerRun: null})},
           `Compare with the ${selected.length - 1} other selected run${selected.length > 2 ? "s" : ""}`)
      : null].filter(Boolean));
  heading.dataset.layer = layer;
  heading.dataset.runs = runs.map((r) => r.run).join("\n");
  // One bin per two pixels of a chart's width, as the heatmaps have (each bin keeps its min, max and NaN/Inf).
  const width = (panels.root.clientWidth || 900) - PANEL_PADDING;
  const columns = Math.max(1, Math.floor((width + GAP_X) / (MIN_CHART_WIDTH + GAP_X)));
  const points = Math.max(40, Math.min(1500, Math.round(chartWidth(width, columns) / 2)));
  // A chart per metric of the module's members that some selected run records.
  const recorded = (m) => tagList.some((tg) => tg && needsOf(m).every((x) => tg.metrics[x]));
  const plan = [];
  for (const [kind, metrics] of [["param", PARAM_METRICS], ["site", SITE_METRICS], ["module", MODULE_METRICS]]) {
    for (const m of metrics) if (mem[kind].length && recorded(m)) plan.push([m, kind, mem[kind]]);
  }
  const results = await Promise.all(plan.map(([m, , names]) => Promise.all(runs.map((r, k) => {
    const tg = tagList[k];
    const needs = needsOf(m);
    if (!tg || !needs.every((x) => tg.metrics[x])) return null;
    const have = names.filter((n) => needs.every((x) => tg.metrics[x].layers.includes(n)));
    if (!have.length) return null;
    return fetchMetric(r.run, m, {points, layers: have}).catch((e) => e);
  }))));
  if (ctx.stale()) return;
  // Every chart is a subplot of one figure, which Plotly draws faster than six figures (benchmarks/RESULTS.md,
  // "The clicks still over 300 ms, and /tags"). Each trace's meta names its metric; each subplot has its
  // metric's title.
  const charts = [];
  const notes = [];
  const unrecorded = [];
  plan.forEach(([m, , names], q) => {
    const traces = [];
    const errs = [];
    runs.forEach((r, k) => {
      const v = results[q][k];
      if (v instanceof Error) errs.push(`${r.run}: ${v.message}`);
      if (!v || v instanceof Error) return;
      const color = app.runColor(r.run);
      const x = Array.from(v.stepFirst);
      names.forEach((n, d) => {
        const j = v.layerIndex(n);
        if (j < 0) return;
        const legendName = names.length > 1 ? `${r.run} · ${n.slice(layer ? layer.length + 1 : 0) || n}` : r.run;
        const meta = (role) => ({run: r.run, layer: n, role, metric: m});
        if (v.binned && !isDerived(m)) {
          traces.push({type: "scatter", mode: "lines", x, y: v.column(j, "min").map(fin), line: {width: 0}, hoverinfo: "skip", showlegend: false, meta: meta("min")});
          traces.push({type: "scatter", mode: "lines", x, y: v.column(j, "max").map(fin), line: {width: 0}, fill: "tonexty",
                       fillcolor: alpha(color, 0.13), hoverinfo: "skip", showlegend: false, meta: meta("max")});
        }
        traces.push({type: "scatter", mode: v.B === 1 ? "markers" : "lines", x, y: v.column(j).map(fin), name: esc(legendName),
                     line: {color, width: 1.6, dash: DASHES[d % DASHES.length]}, marker: {color, size: 7}, meta: meta("value"),
                     hovertemplate: `${esc(legendName)}<br>step %{x}<br>%{y:.4g}<extra></extra>`});
        const bad = [];
        for (let i = 0; i < v.B; i++) if (v.has(i, j) && v.bad(i, j)) bad.push(x[i]);
        if (bad.length) {
          traces.push({type: "scatter", mode: "markers", x: bad, y: bad.map(() => 0.97), nonfinite: true, name: "non-finite",
                       marker: {symbol: "x", size: 8, color: NONFINITE}, showlegend: false, meta: meta("nonfinite"),
                       hovertemplate: `${esc(legendName)}: NaN/Inf at step %{x}<extra></extra>`});
        }
      });
    });
    const styles = names.length > 1 ? names.map((n, d) => `${DASH_TEXT[d % DASH_TEXT.length]} ${n.slice(layer ? layer.length + 1 : 0) || n}`) : [];
    if (styles.length || errs.length) notes.push(`${label(m)}: ${[...styles, ...errs].join(" · ")}`);
    if (!traces.length) unrecorded.push(label(m));
    else charts.push({metric: m, traces});
  });
  const p = panels.panel("layer", [], {wide: true});
  p.box.dataset.metrics = charts.map((c) => c.metric).join(" ");
  if (unrecorded.length) notes.push(`Not recorded for this layer in the selected runs: ${unrecorded.join(", ")}`);
  for (const text of notes) p.note.append(el("div", {class: "muted small"}, text));
  if (!charts.length) {
    panels.notice(p, "Not recorded for this layer in the selected runs.");
    return panels.end();
  }
  const figure = subplots(charts, columns, p.chart.clientWidth || width, t, app.state.step);
  runLegend(figure.traces); // runs by colour (one legend for every chart), members by line style (noted above)
  panels.plot(p, figure.traces, layout(t, {...RUN_LEGEND, ...figure.layout, uirevision: layer}), `${layer || "model"}_metrics`);
  panels.end();
}

// The subplots of the drill-down's one figure, in rows of `columns`: per chart its own axes, its metric's
// scale, a title, the chosen step and, where it has any, a hidden 0-1 axis for its non-finite marks.
const CHART_HEIGHT = 200; // px of plot area per chart
const GAP_Y = 72; // px between rows: the x axis' ticks and title, then the next row's titles
const GAP_X = 84; // px between columns: the y axis' tick labels
const MIN_CHART_WIDTH = 420;
const TOP = 54; // the legend, then the first row's titles
const BOTTOM = 40;
const LEFT = 64;
const RIGHT = 10;
const PANEL_PADDING = 26; // a panel's padding and border, around its chart

function chartWidth(width, columns) {
  return (Math.max(100, width - LEFT - RIGHT) - (columns - 1) * GAP_X) / columns;
}

function subplots(charts, columns, width, t, step) {
  const rows = Math.ceil(charts.length / columns);
  const plotH = rows * CHART_HEIGHT + (rows - 1) * GAP_Y;
  const plotW = Math.max(100, width - LEFT - RIGHT);
  const chartW = chartWidth(width, columns);
  const lay = {height: TOP + plotH + BOTTOM, margin: {l: LEFT, r: RIGHT, t: TOP, b: BOTTOM}, annotations: [], shapes: [],
               legend: {...RUN_LEGEND.legend, y: 1 + 24 / plotH}}; // above the first row's titles
  const traces = [];
  let hidden = charts.length; // the non-finite axes come after the charts' own
  charts.forEach(({metric, traces: own}, q) => {
    const row = Math.floor(q / columns);
    const col = q % columns;
    const id = q ? String(q + 1) : "";
    const x0 = (col * (chartW + GAP_X)) / plotW;
    const y1 = 1 - (row * (CHART_HEIGHT + GAP_Y)) / plotH;
    const scale = METRICS[metric].scale;
    lay["xaxis" + id] = axis(t, {domain: [x0, Math.min(1, x0 + chartW / plotW)], anchor: "y" + id, automargin: false,
                                 title: {text: "step", standoff: 4}});
    lay["yaxis" + id] = axis(t, {domain: [Math.max(0, y1 - CHART_HEIGHT / plotH), y1], anchor: "x" + id, automargin: false,
                                 type: scale === "log" ? "log" : "linear", range: scale === "unit" ? [0, 1.02] : undefined,
                                 exponentformat: "power"});
    lay.annotations.push({text: esc(label(metric)), xref: `x${id} domain`, yref: `y${id} domain`, x: 0, y: 1, xanchor: "left",
                          yanchor: "bottom", yshift: 4, showarrow: false, font: {size: 13, color: t.fg}});
    let bad = null;
    for (const tr of own) {
      tr.xaxis = "x" + id;
      if (tr.nonfinite) {
        delete tr.nonfinite;
        if (!bad) bad = String(++hidden);
        tr.yaxis = "y" + bad;
      } else tr.yaxis = "y" + id;
      traces.push(tr);
    }
    if (bad) lay["yaxis" + bad] = {...nonfiniteAxis(), overlaying: "y" + id};
    if (step) {
      lay.shapes.push({type: "line", xref: "x" + id, yref: `y${id} domain`, x0: step.lo, x1: step.lo, y0: 0, y1: 1,
                       line: {color: t.muted, width: 1.5, dash: "dot"}});
    }
  });
  return {traces, layout: lay};
}

// Every module that owns a series, in model order (first run first), and its members: kept for the same
// runs' same /tags answers, so that a later render does not index 5,000 tensors' names over a dozen
// metrics again.
let indexed = null;
function moduleIndex(runs, tagList) {
  const same = indexed && indexed.runs.length === runs.length &&
    runs.every((r, k) => r.run === indexed.runs[k] && tagList[k] === indexed.tagList[k]);
  if (same) return indexed;
  const modules = [];
  const members = new Map(); // module -> {param: [], site: [], module: [], types: Map(site -> Map(type -> [runs]))}
  let run = null;
  const add = (mod, kind, n, type) => {
    if (!members.has(mod)) {
      members.set(mod, {param: [], site: [], module: [], types: new Map(), seen: new Set()});
      modules.push(mod);
    }
    const e = members.get(mod);
    if (!e.seen.has(kind + "\n" + n)) {
      e.seen.add(kind + "\n" + n);
      e[kind].push(n);
    }
    if (type) {
      const byType = e.types.get(n) || new Map();
      if (!(byType.get(type) || []).includes(run)) byType.set(type, [...(byType.get(type) || []), run]);
      e.types.set(n, byType);
    }
  };
  // The metrics of one layer set (a gradient's norm, max, the weight norm, ...) name the same layers: each
  // distinct list is indexed once (at 5,000 tensors each pass took tens of ms).
  const distinct = (tg, metrics) => {
    const out = [];
    for (const m of metrics) {
      const info = tg.metrics[m];
      if (info && !out.some((o) => sameNames(o, info))) out.push(info);
    }
    return out;
  };
  for (const [k, tg] of tagList.entries()) {
    if (!tg) continue;
    run = runs[k].run;
    for (const info of distinct(tg, PARAM_METRICS)) for (const n of info.layers) add(moduleOf(n, "param"), "param", n);
    for (const info of distinct(tg, SITE_METRICS)) {
      info.layers.forEach((n, j) => add(moduleOf(n, "site"), "site", n, info.layer_types[j]));
    }
    for (const info of distinct(tg, MODULE_METRICS)) for (const n of info.layers) add(moduleOf(n, "module"), "module", n);
  }
  indexed = {runs: runs.map((r) => r.run), tagList, modules, members};
  return indexed;
}

function sameNames(a, b) {
  if (a.layers.length !== b.layers.length) return false;
  for (let i = 0; i < a.layers.length; i++) {
    if (a.layers[i] !== b.layers[i] || (a.layer_types[i] || "") !== (b.layer_types[i] || "")) return false;
  }
  return true;
}

// The picker lists every module that owns a series: thousands in a big model. Built, they take longer than
// the charts, and the browser measures each of them again whenever the view is shown. So the picker holds
// the chosen module only, and the whole list from when the user focuses, presses or types on it until a
// render while it is not focused.
let pickerModules = [];
function showPicker(modules, layer) {
  pickerModules = modules;
  clear(picker).append(new Option(moduleText(layer), layer, true, true));
  picker.dataset.filled = "false";
  if (document.activeElement === picker) fillPicker(); // chosen from the picker: the list stays for the next key
}

function fillPicker() {
  if (picker.dataset.filled !== "false") return;
  const chosen = picker.value;
  const all = document.createDocumentFragment();
  for (const m of pickerModules) all.append(new Option(moduleText(m), m, m === chosen, m === chosen));
  clear(picker).append(all);
  picker.value = chosen;
  picker.dataset.filled = "true";
}

function moduleText(m) {
  return m === "" ? "(model)" : m;
}

function fin(y) {
  return y != null && Number.isFinite(y) ? y : null;
}

export default {id: "layer", title: "Layer", init, render};
