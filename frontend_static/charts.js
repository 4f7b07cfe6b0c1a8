// Plotly glue shared by the views: theme, colours, escaping, panels, heatmaps.
import {el, clear, fmt, message} from "./dom.js";

export const FONT = 'Roboto, "Helvetica Neue", Arial, sans-serif';
export const ACCENT = "#f57c00"; // TensorBoard's orange
export const NONFINITE = "#ff1f8e"; // magenta: outside viridis, visible to colour-blind users
// The hidden 0-1 axis that non-finite marks (traces on "y2") are drawn against.
export const nonfiniteAxis = () => ({overlaying: "y", range: [0, 1], visible: false, fixedrange: true});
// A line chart's layout entry for it, only where `traces` hold such marks (an axis more is more to draw).
export const nonfiniteAxisOf = (traces) => (traces.some((tr) => tr.yaxis === "y2") ? {yaxis2: nonfiniteAxis()} : {});
export const ZERO_NOTE = "zero";

// Paul Tol's colour-blind-safe schemes, the family TensorBoard's own run
// colours come from; pinks are left out, they belong to non-finite values.
const RUN_COLORS = ["#0077bb", "#ee7733", "#009988", "#33bbee", "#cc3311", "#999933", "#8866cc", "#996633", "#117733", "#888888"];
const SERIES_COLORS = ["#4477aa", "#ccbb44", "#228833", "#66ccee", "#ee6677", "#bbbbbb"];

export function seriesColor(i) {
  return SERIES_COLORS[i % SERIES_COLORS.length];
}

// A run keeps its colour: the first time this browser sees a run, it gets the
// palette slot of its name's hash (FNV-1a of the UTF-8 bytes), or the next slot
// that no other listed run holds; the choice is kept (localStorage), so it
// survives reloads, and runs that appear later never move the others.
const STORE = "tb-diag.run-colours";
let slots = null; // run name -> index into RUN_COLORS

export function hashSlot(run) {
  let h = 0x811c9dc5;
  for (const b of new TextEncoder().encode(String(run))) h = Math.imul(h ^ b, 0x01000193) >>> 0;
  return h % RUN_COLORS.length;
}

function loadSlots() {
  try {
    const kept = JSON.parse(window.localStorage.getItem(STORE) || "{}");
    return new Map(Object.entries(kept).filter(([, k]) => Number.isInteger(k) && k >= 0 && k < RUN_COLORS.length));
  } catch (e) {
    return new Map(); // storage blocked: colours still follow the names
  }
}

// Give each listed run (in the server's order) its colour, once.
export function assignRunColours(names) {
  slots = slots || loadSlots();
  const used = new Set(names.filter((n) => slots.has(n)).map((n) => slots.get(n)));
  let changed = false;
  for (const n of names) {
    if (slots.has(n)) continue;
    const k = hashSlot(n);
    let free = k;
    for (let p = 0; p < RUN_COLORS.length; p++) {
      if (!used.has((k + p) % RUN_COLORS.length)) {
        free = (k + p) % RUN_COLORS.length;
        break;
      }
    }
    slots.set(n, free);
    used.add(free);
    changed = true;
  }
  if (!changed) return;
  const keep = [...slots].slice(-2000); // bounded: the runs given a colour last
  slots = new Map(keep);
  try {
    window.localStorage.setItem(STORE, JSON.stringify(Object.fromEntries(keep)));
  } catch (e) {
    // storage full or blocked: the colours hold for this page
  }
}

export function runColorFor(run) {
  slots = slots || loadSlots();
  return RUN_COLORS[slots.get(run) ?? hashSlot(run)];
}

// A legend entry per run on a chart that overlays runs: the first "value"
// trace of each run is named after it; every other trace stays out.
export function runLegend(traces) {
  const seen = new Set();
  for (const tr of traces) {
    const run = tr.meta && tr.meta.role === "value" ? tr.meta.run : null;
    tr.legendgroup = tr.meta?.run;
    if (run == null || seen.has(run)) {
      tr.showlegend = false;
      continue;
    }
    seen.add(run);
    tr.showlegend = true;
    tr.name = esc(run);
  }
  return traces;
}

// Margins that hold the axes' labels without Plotly's automargin, which draws a chart twice (once to
// measure its labels, once with the margins they need): for the line charts drawn several to a view.
export const FIXED_MARGINS = {margin: {l: 64, r: 10, t: 26, b: 40}};

// The width in px of the widest of `texts` at `size` px in the tab's font, measured on a canvas (no layout):
// what a margin must hold for labels that Plotly would otherwise measure, then draw the chart again for.
let measurer = null;
export function textWidth(texts, size) {
  measurer = measurer || document.createElement("canvas").getContext("2d");
  measurer.font = `${size}px ${FONT}`;
  let widest = 0;
  for (const s of texts) widest = Math.max(widest, measurer.measureText(String(s)).width);
  return Math.ceil(widest);
}

// Layout of that legend: one row above the plot, like the run list's swatches.
export const RUN_LEGEND = {showlegend: true, legend: {orientation: "h", x: 0, y: 1.02, xanchor: "left", yanchor: "bottom", font: {size: 11}}};

export function alpha(hex, a) {
  const n = parseInt(hex.slice(1), 16);
  return `rgba(${(n >> 16) & 255},${(n >> 8) & 255},${n & 255},${a})`;
}

// Plotly renders a small HTML subset in labels, titles and hover text:
// every name that came from data goes through here before Plotly sees it.
export function esc(s) {
  return String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
}

export function theme(dark) {
  return dark
    ? {dark, fg: "#e8eaed", muted: "#aaaaaa", grid: "#4a4a4a", zero: "#777", bg: "#303030", panel: "#3a3a3a"}
    : {dark, fg: "#212121", muted: "#616161", grid: "#e6e6e6", zero: "#bdbdbd", bg: "#ffffff", panel: "#ffffff"};
}

// `ticklabeloverflow: "allow"`: Plotly's default on numeric axes measures every tick label's box (a layout
// each) to hide the ones that cross the chart's edge, which the margins here already leave room for.
export function axis(t, extra = {}) {
  return {gridcolor: t.grid, zerolinecolor: t.zero, linecolor: t.grid, tickfont: {size: 11, color: t.muted},
          title: {font: {size: 11, color: t.muted}}, automargin: true, ticklabeloverflow: "allow", ...extra};
}

export function layout(t, extra = {}) {
  const {xaxis, yaxis, ...rest} = extra;
  return {
    font: {family: FONT, size: 12, color: t.fg},
    paper_bgcolor: "rgba(0,0,0,0)",
    plot_bgcolor: "rgba(0,0,0,0)",
    margin: {l: 56, r: 16, t: 12, b: 40},
    hovermode: "closest",
    hoverlabel: {font: {family: FONT, size: 12}},
    showlegend: false,
    legend: {orientation: "h", y: -0.22, font: {size: 11}},
    xaxis: axis(t, xaxis || {}),
    yaxis: axis(t, yaxis || {}),
    ...rest,
  };
}

export function config(filename) {
  return {
    responsive: true,
    displaylogo: false,
    modeBarButtonsToRemove: ["lasso2d", "select2d", "autoScale2d"],
    toImageButtonOptions: {format: "png", filename: String(filename).replace(/[^A-Za-z0-9_.-]+/g, "_"), scale: 2},
  };
}

export function plot(div, data, lay, filename) {
  return window.Plotly.react(div, data, lay, config(filename));
}

// Panels keep their chart <div> between renders, so a live update or a
// re-render goes through Plotly.react and keeps the user's zoom (uirevision).
export class Panels {
  constructor(root) {
    this.root = root;
    this.map = new Map();
    this.order = [];
  }

  begin() {
    this.order = [];
  }

  panel(key, title, opts = {}) {
    let p = this.map.get(key);
    if (!p) {
      const head = el("div", {class: "panel-head"});
      const note = el("div", {class: "panel-note"});
      const chart = el("div", {class: "chart"});
      const box = el("section", {class: "panel" + (opts.wide ? " wide" : ""), dataset: {panel: key}}, head, note, chart);
      p = {key, box, head, note, chart, hasPlot: false};
      this.map.set(key, p);
      // attached at once, so that Plotly sizes the chart to its panel
      this.root.appendChild(box);
    }
    p.box.className = "panel" + (opts.wide ? " wide" : "") + (opts.cls ? " " + opts.cls : "");
    clear(p.head).append(...(Array.isArray(title) ? title : [el("h3", {text: title})]));
    clear(p.note);
    p.chart.style.display = "";
    this.order.push(p);
    return p;
  }

  // The panel holds a message instead of a chart.
  notice(p, text, kind = "info") {
    if (p.hasPlot) {
      window.Plotly.purge(p.chart);
      p.hasPlot = false;
    }
    p.chart.style.display = "none";
    p.note.append(message(text, kind));
  }

  plot(p, data, lay, filename) {
    p.chart.style.display = "";
    p.hasPlot = true;
    return plot(p.chart, data, lay, filename);
  }

  end() {
    const keep = new Set(this.order);
    for (const [key, p] of this.map) {
      if (!keep.has(p)) {
        if (p.hasPlot) window.Plotly.purge(p.chart);
        p.box.remove();
        this.map.delete(key);
      }
    }
    // moving an element keeps its Plotly state; only panels out of place move
    this.order.forEach((p, i) => {
      const at = this.root.children[i];
      if (at !== p.box) this.root.insertBefore(p.box, at || null);
    });
  }
}

// Colour-axis ticks for log10 data: powers of ten (or 1-2-5 on short ranges).
export function logTicks(zmin, zmax) {
  const vals = [];
  const text = [];
  const lo = Math.floor(zmin);
  const hi = Math.ceil(zmax);
  const span = hi - lo;
  const step = span > 12 ? Math.ceil(span / 8) : 1;
  const mults = span <= 2 ? [1, 2, 5] : [1];
  for (let k = lo; k <= hi; k += step) {
    for (const m of mults) {
      const v = k + Math.log10(m);
      if (v >= zmin - 1e-9 && v <= zmax + 1e-9) {
        vals.push(v);
        text.push(fmt(m * Math.pow(10, k), 2));
      }
    }
  }
  if (vals.length < 2) {
    vals.splice(0, vals.length, zmin, zmax);
    text.splice(0, text.length, fmt(Math.pow(10, zmin), 3), fmt(Math.pow(10, zmax), 3));
  }
  return {tickvals: vals, ticktext: text};
}

// A layers x steps heatmap of `v` (a Values) over the given layer columns.
// scale: "log" (colour is log10), "unit" (0..1), "linear".
// Returns Plotly traces: the heatmap, then non-finite cells in their own colour.
export function heatmapTraces(v, cols, labels, {scale, metricLabel, colorscale}) {
  const B = v.B;
  const x = Array.from(v.stepFirst);
  const z = [];
  const raw = [];
  const bad = [];
  let anyBad = false;
  let badRows = 0;
  let firstBad = Infinity;
  let zmin = Infinity;
  let zmax = -Infinity;
  for (const j of cols) {
    const zr = new Array(B);
    const rr = new Array(B);
    const br = new Array(B);
    let rowBad = false;
    for (let i = 0; i < B; i++) {
      br[i] = null;
      if (!v.has(i, j)) {
        zr[i] = null;
        rr[i] = null;
        continue;
      }
      const val = v.at(i, j);
      rr[i] = Number.isFinite(val) ? val : String(val);
      if (v.bad(i, j)) {
        br[i] = v.at(i, j, "nonfinite") || 1;
        anyBad = true;
        rowBad = true;
        firstBad = Math.min(firstBad, v.stepFirst[i]);
      }
      if (!Number.isFinite(val)) {
        zr[i] = null;
        continue;
      }
      if (scale === "log") {
        zr[i] = val > 0 ? Math.log10(val) : val === 0 ? -Infinity : null;
      } else zr[i] = val;
      if (Number.isFinite(zr[i])) {
        zmin = Math.min(zmin, zr[i]);
        zmax = Math.max(zmax, zr[i]);
      }
    }
    if (rowBad) badRows++;
    z.push(zr);
    raw.push(rr);
    bad.push(br);
  }
  if (!Number.isFinite(zmin)) {
    zmin = scale === "log" ? -1 : 0;
    zmax = scale === "log" ? 0 : 1;
  }
  // Exact zeros on a log scale sit at the bottom of the colour range.
  if (scale === "log") for (const zr of z) for (let i = 0; i < zr.length; i++) if (zr[i] === -Infinity) zr[i] = zmin;
  if (scale === "unit") {
    zmin = 0;
    zmax = 1;
  }
  if (zmax - zmin < 1e-12) {
    zmax = zmin + (scale === "log" ? 1 : Math.abs(zmin) * 0.01 || 1);
  }
  const colorbar = {thickness: 12, len: 1, outlinewidth: 0, tickfont: {size: 10}, x: 1.005, xpad: 4, ypad: 0};
  if (scale === "log") Object.assign(colorbar, logTicks(zmin, zmax));
  const y = labels;
  const main = {
    type: "heatmap", x, y, z, customdata: raw, zmin, zmax, colorscale: colorscale || "Viridis", colorbar,
    hoverongaps: false, xgap: 0, ygap: 0,
    hovertemplate: `%{y}<br>step %{x}<br>${esc(metricLabel)} = %{customdata:.4g}<extra></extra>`,
  };
  const traces = [main];
  if (anyBad) {
    traces.push({
      type: "heatmap", x, y, z: bad.map((r) => r.map((c) => (c == null ? null : 1))), customdata: bad,
      zmin: 0, zmax: 1, colorscale: [[0, NONFINITE], [1, NONFINITE]], showscale: false, hoverongaps: false,
      hovertemplate: `%{y}<br>step %{x}<br>non-finite (NaN/Inf): %{customdata} value(s)<extra></extra>`,
    });
  }
  return {traces, anyBad, badRows, firstBad, zmin, zmax};
}

// Height for a heatmap of n layers: one readable row each up to a limit.
export function heatmapHeight(n) {
  return Math.max(220, Math.min(760, 90 + n * 16));
}

// A chart's line: values with nulls for absent steps; non-finite become gaps.
export function finiteOrNull(arr) {
  return arr.map((v) => (v == null || !Number.isFinite(v) ? null : v));
}

// Plotly's first heatmap in a page, and its first line chart on a category axis with error bars, cost
// several times a later one (code paths set up once per page, and the first text with the glyphs below:
// benchmarks/RESULTS.md, "The clicks still over 300 ms, and /tags"). So once the tab is idle, one small
// figure of each kind is drawn off-screen and removed. Resolves when done (`done`: "warm" or "failed"; the tab works the same either way).
export async function warmUp(t) {
  const div = el("div", {"aria-hidden": "true", style: {position: "fixed", left: "-3000px", top: "0", width: "900px"}});
  document.body.append(div);
  // the glyphs of group rows, site types and ranges: the first text with one not in the page's font has
  // the browser look for a font that has it (most of a first heatmap's cost, measured)
  const y = ["⚠ ▸ a … b (2)", "c · ReLU", "d – e"];
  const heat = {type: "heatmap", x: [0, 1, 2], y, z: [[1, 2, 3], [2, null, 1], [3, 1, 2]], colorscale: "Viridis",
                colorbar: {thickness: 12, len: 1, outlinewidth: 0, tickfont: {size: 10}, ...logTicks(0, 1)}};
  const bad = {type: "heatmap", x: [0, 1, 2], y, z: [[null, 1, null], [null, null, null], [1, null, null]],
               zmin: 0, zmax: 1, colorscale: [[0, NONFINITE], [1, NONFINITE]], showscale: false};
  const profile = {type: "scatter", mode: "lines+markers", x: y, y: [1, 2, 3], xaxis: "x2", yaxis: "y2",
                   error_y: {type: "data", symmetric: false, array: [1, 1, 1], arrayminus: [0.5, 0.5, 0.5]}};
  try {
    await window.Plotly.newPlot(div, [heat, bad, profile], layout(t, {
      height: 500, grid: {rows: 2, columns: 1, pattern: "independent"},
      yaxis: {type: "category", autorange: "reversed"}, xaxis2: axis(t, {type: "category", tickangle: -45}),
      yaxis2: axis(t, {type: "log", exponentformat: "power"}),
      shapes: [{type: "rect", xref: "paper", yref: "y", x0: 0, x1: 1, y0: 0.5, y1: 1.5}],
    }), config("warm"));
    window.Plotly.purge(div);
    return "warm";
  } catch (e) {
    return "failed";
  } finally {
    div.remove();
  }
}
