// Layer drill-down: every metric of one module (its parameters, its
// activation sites, its own output) over steps: of the run it was opened
// from (a model node, a finding, a heatmap cell), or the selected runs overlaid.
import * as api from "../api.js";
import {el, clear} from "../dom.js";
import {FIXED_MARGINS, NONFINITE, Panels, RUN_LEGEND, alpha, esc, layout, nonfiniteAxisOf, runLegend} from "../charts.js";
import {METRICS, MODULE_METRICS, PARAM_METRICS, SITE_METRICS, fetchMetric, isDerived, label, moduleOf, needsOf} from "../metrics.js";

let panels;
let picker;
let heading;

const DASHES = ["solid", "dash", "dot", "dashdot", "longdash"];
const DASH_TEXT = ["——", "– –", "···", "–·–", "— —"];

function init(root, app) {
  picker = el("select", {class: "layer-picker", "aria-label": "Layer", onchange: (e) => app.select({layer: e.target.value, layerRun: app.state.layerRun})});
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
  // Every module that owns a series, in model order (first run first).
  const modules = [];
  const members = new Map(); // module -> {param: [], site: [], module: [], types: Map(site -> Map(type -> [runs]))}
  let run = null;
  const add = (mod, kind, n, type) => {
    if (!members.has(mod)) {
      members.set(mod, {param: [], site: [], module: [], types: new Map()});
      modules.push(mod);
    }
    const e = members.get(mod);
    const list = e[kind];
    if (!list.includes(n)) list.push(n);
    if (type) {
      const byType = e.types.get(n) || new Map();
      if (!(byType.get(type) || []).includes(run)) byType.set(type, [...(byType.get(type) || []), run]);
      e.types.set(n, byType);
    }
  };
  for (const [k, tg] of tagList.entries()) {
    if (!tg) continue;
    run = runs[k].run;
    for (const m of PARAM_METRICS) for (const n of tg.metrics[m]?.layers || []) add(moduleOf(n, "param"), "param", n);
    for (const m of SITE_METRICS) {
      const info = tg.metrics[m];
      if (info) info.layers.forEach((n, j) => add(moduleOf(n, "site"), "site", n, info.layer_types[j]));
    }
    for (const m of MODULE_METRICS) for (const n of tg.metrics[m]?.layers || []) add(moduleOf(n, "module"), "module", n);
  }
  if (!modules.length) {
    clear(picker);
    pickerList = null;
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
  const fill = showPicker(modules, layer);
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
  const points = Math.max(40, Math.min(1500, Math.round(((panels.root.clientWidth || 900) / 2) - 60)));
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
  plan.forEach(([m, , names], q) => {
    const p = panels.panel("layer:" + m, label(m));
    p.box.dataset.metric = m;
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
        if (v.binned && !isDerived(m)) {
          traces.push({type: "scatter", mode: "lines", x, y: v.column(j, "min").map(fin), line: {width: 0}, hoverinfo: "skip", showlegend: false, meta: {run: r.run, layer: n, role: "min"}});
          traces.push({type: "scatter", mode: "lines", x, y: v.column(j, "max").map(fin), line: {width: 0}, fill: "tonexty",
                       fillcolor: alpha(color, 0.13), hoverinfo: "skip", showlegend: false, meta: {run: r.run, layer: n, role: "max"}});
        }
        traces.push({type: "scatter", mode: v.B === 1 ? "markers" : "lines", x, y: v.column(j).map(fin), name: esc(legendName),
                     line: {color, width: 1.6, dash: DASHES[d % DASHES.length]}, marker: {color, size: 7},
                     meta: {run: r.run, layer: n, role: "value"},
                     hovertemplate: `${esc(legendName)}<br>step %{x}<br>%{y:.4g}<extra></extra>`});
        const bad = [];
        for (let i = 0; i < v.B; i++) if (v.has(i, j) && v.bad(i, j)) bad.push(x[i]);
        if (bad.length) {
          traces.push({type: "scatter", mode: "markers", x: bad, y: bad.map(() => 0.97), yaxis: "y2", name: "non-finite",
                       marker: {symbol: "x", size: 8, color: NONFINITE}, showlegend: false, meta: {run: r.run, layer: n, role: "nonfinite"},
                       hovertemplate: `${esc(legendName)}: NaN/Inf at step %{x}<extra></extra>`});
        }
      });
    });
    const styles = names.length > 1 ? names.map((n, d) => `${DASH_TEXT[d % DASH_TEXT.length]} ${n.slice(layer ? layer.length + 1 : 0) || n}`) : [];
    p.note.append(el("span", {class: "muted small"}, [...styles, ...errs].join(" · ")));
    if (!traces.length) return panels.notice(p, `Not recorded for this layer in the selected runs.`);
    const step = app.state.step;
    const scale = METRICS[m].scale;
    runLegend(traces); // runs by colour (legend), members by line style (noted above)
    panels.plot(p, traces, layout(t, {
      ...RUN_LEGEND,
      ...FIXED_MARGINS,
      height: 260,
      uirevision: `${layer}|${m}`,
      xaxis: {title: {text: "step"}, automargin: false},
      yaxis: {type: scale === "log" ? "log" : "linear", range: scale === "unit" ? [0, 1.02] : undefined, exponentformat: "power",
              automargin: false},
      ...nonfiniteAxisOf(traces),
      shapes: step ? [{type: "line", xref: "x", yref: "paper", x0: step.lo, x1: step.lo, y0: 0, y1: 1, line: {color: t.muted, width: 1.5, dash: "dot"}}] : [],
    }), `${layer || "model"}_${m}`);
  });
  panels.end();
  if (fill) setTimeout(fill);
}

// The picker lists every module that owns a series: thousands in a big model, which take longer to build
// than the charts to draw. So a new list is built after the charts (the returned function, or null when
// the picker holds this list already); until then the picker holds the chosen module.
let pickerList = null; // the list the picker holds, or the one it waits for
let pickerFull = false;
function showPicker(modules, layer) {
  const key = modules.join("\n");
  if (key === pickerList && pickerFull) {
    picker.value = layer;
    return null;
  }
  pickerList = key;
  pickerFull = false;
  const text = (m) => (m === "" ? "(model)" : m);
  clear(picker).append(new Option(text(layer), layer, true, true));
  return () => {
    if (pickerList !== key || pickerFull) return; // a later render's list, or built already
    const chosen = picker.value;
    const all = document.createDocumentFragment();
    for (const m of modules) all.append(new Option(text(m), m, m === chosen, m === chosen));
    clear(picker).append(all);
    picker.value = chosen;
    pickerFull = true;
  };
}

function fin(y) {
  return y != null && Number.isFinite(y) ? y : null;
}

export default {id: "layer", title: "Layer", init, render};
