// The layers x steps form shared by Gradient flow and Activations: a heatmap
// per selected run, a metric switch, a layer search, and a per-step profile
// (the values of every layer at the step clicked in a heatmap).
import * as api from "../api.js";
import {el} from "../dom.js";
import {ACCENT, NONFINITE, Panels, alpha, esc, heatmapHeight, heatmapTraces, layout, nonfiniteAxis, textWidth} from "../charts.js";
import {CONTRACT, METRICS, colorscale, fetchMetric, hasMetric, label, missingText, moduleOf, needsOf} from "../metrics.js";

// `intro` says how to read the view; `help[metric]` what the chosen metric is (shown with it).
export function heatmapView({id, title, metrics, kind, profileTitle, intro, help = {}}) {
  const view = {id, title};
  let metric = null;
  let search = "";
  let panels;
  let select;
  let searchBox;
  let countNote;
  let collapseButton;
  let helpNote;
  // Groups of layers the user opened (keys from the server's grouped answers, tb_diag_plugin/http_api.md).
  const expanded = new Set();

  // A row is a layer, or a group of layers (`v.group(j)`) that a click opens; a group that holds a
  // NaN/Inf anywhere in the view is marked, so one bad tensor among thousands is never hidden.
  function layerLabel(v, j, bad = false) {
    const g = v.group(j);
    if (g) return esc(`${bad ? "⚠ " : ""}▸ ${g.label} (${g.members})`);
    const t = v.layerTypes[j];
    return esc(kind === "site" && t ? `${v.layers[j]} · ${t}` : v.layers[j]);
  }

  function rowBad(v, j) {
    for (let i = 0; i < v.B; i++) if (v.bad(i, j)) return true;
    return false;
  }

  // Whether row j of run `run` is chosen (app.isChosen): a layer, or a group holding a chosen layer
  // (a clicked finding's layers, else the chosen module's).
  function chosen(app, run, v, j) {
    if (!v.group(j)) return app.isChosen(run, v.layers[j], kind);
    if (v.group(j).revealed) return true; // holds some of the layers asked to be revealed (`revealed`)
    const key = v.layers[j];
    const within = (module) => key === "" || module === key || module.startsWith(key + ".");
    const {marked, layer, layerRun} = app.state;
    if (marked) return marked.run === run && marked.layers.some((n) => within(moduleOf(n, kind)));
    return layer != null && (layerRun == null || layerRun === run) && within(layer);
  }

  // As many layer rows as the screen has room for (at most the contract's): groups along the module tree beyond.
  function maxRows() {
    return Math.max(16, Math.min(CONTRACT.heatmap_max_rows, Math.floor(((window.innerHeight || 900) - 140) / 10)));
  }

  // The layers that get rows of their own in a grouped view: a clicked finding's (its run only), else the
  // chosen module's; so a finding's layers are opened and highlighted first.
  async function revealed(run, app) {
    const {marked, layer, layerRun} = app.state;
    if (marked ? marked.run !== run : layer == null || (layerRun != null && layerRun !== run)) return [];
    try {
      const t = await api.tags(run);
      const layers = t.metrics[needsOf(metric)[0]]?.layers || [];
      if (layers.length <= maxRows()) return []; // every layer has a row already: the same answer serves
      const known = new Set(layers);
      const want = marked ? marked.layers.filter((n) => known.has(n)) : layers.filter((n) => moduleOf(n, kind) === layer);
      return want.slice(0, 64);
    } catch (e) {
      return [];
    }
  }

  function rowsOpts(reveal) {
    return {maxRows: maxRows(), expand: [...expanded].sort(), reveal};
  }

  function matcher() {
    const q = search.trim();
    if (!q) return () => true;
    let re = null;
    try {
      re = new RegExp(q, "i");
    } catch (e) {
      re = null;
    }
    const lower = q.toLowerCase();
    return (s) => (re ? re.test(s) : s.toLowerCase().includes(lower));
  }

  // The ratio is computed once per pair of (cached) inputs, so that a
  // re-render with the same data can skip redrawing the heatmap.
  const ratios = new WeakMap();

  view.setMetric = (m) => {
    if (metrics.includes(m)) metric = m;
  };

  view.init = (root, app) => {
    select = el("select", {class: "metric-select", "aria-label": "Metric", onchange: (e) => {
      metric = e.target.value;
      app.render();
    }}, metrics.map((m) => el("option", {value: m}, label(m))));
    searchBox = el("input", {type: "search", class: "layer-search", placeholder: "Search layers (regex)",
                             "aria-label": "Search layers", oninput: (e) => {
                               search = e.target.value;
                               clearTimeout(view.searchTimer);
                               view.searchTimer = setTimeout(() => app.render(), 200);
                             }});
    countNote = el("span", {class: "muted small"});
    collapseButton = el("button", {type: "button", class: "btn collapse-groups", hidden: true, onclick: () => {
      expanded.clear();
      app.render();
    }}, "Collapse groups");
    const legend = el("span", {class: "legend-chip"}, el("span", {class: "chip-box", style: {background: NONFINITE}}), "non-finite (NaN/Inf)");
    helpNote = el("span", {class: "metric-help"});
    root.append(
      el("div", {class: "toolbar"}, el("label", {class: "tool"}, "Metric ", select), searchBox, countNote, collapseButton, legend),
      el("p", {class: "intro muted"}, intro ? intro + " " : "", helpNote));
    const grid = el("div", {class: "panels"});
    root.append(grid);
    panels = new Panels(grid);
  };

  view.render = async (app, ctx) => {
    const t = app.theme();
    const runs = app.selectedRuns();
    panels.begin();
    if (!runs.length) {
      panels.notice(panels.panel("none", title, {wide: true}), "Select one or more runs on the left.");
      panels.end();
      return;
    }
    if (!metric || !runs.some((r) => hasMetric(r, metric))) {
      metric = metrics.find((m) => runs.some((r) => hasMetric(r, m))) || metrics[0];
    }
    select.value = metric;
    const info = METRICS[metric];
    helpNote.dataset.metric = metric;
    helpNote.textContent = help[metric] || `${label(metric)}${info.scale === "unit" ? ", a fraction from 0 to 1" : ""}.`;
    const width = Math.max(320, (panels.root.clientWidth || 900) - 140);
    const points = Math.max(40, Math.min(1000, Math.round(width / 2)));
    const reveals = await Promise.all(runs.map((r) => (hasMetric(r, metric) ? revealed(r.run, app) : [])));
    const data = runs.map((r, k) =>
      hasMetric(r, metric) ? fetchMetric(r.run, metric, {points, ...rowsOpts(reveals[k])}, ratios).catch((e) => e)
        : Promise.resolve(null));
    // The profile's values, asked for with the heatmaps' where its step is known (the chosen one, else the
    // last one the run list gives), else once they are here: the server answers it while they are drawn.
    const known = profileStep(app, runs);
    let profile = known && profileRows(app, runs, runs.map((r) => hasMetric(r, metric)), reveals, known);
    for (let k = 0; k < data.length; k++) data[k] = await data[k];
    if (ctx.stale()) return;
    const first = data.find((v) => v && !(v instanceof Error) && v.B);
    if (!first) profile = null; // no data to profile
    else if (!profile) {
      profile = profileRows(app, runs, data.map((v) => v && !(v instanceof Error)), reveals,
                            {lo: first.lastStep, hi: first.lastStep});
    }
    const match = matcher();
    let shown = 0;
    let total = 0;
    let anyGroups = false;
    runs.forEach((r, k) => {
      const v = data[k];
      const p = panels.panel(`${id}:${r.run}`, [
        el("span", {class: "swatch", style: {background: app.runColor(r.run)}}),
        el("h3", {}, r.run),
        el("span", {class: "muted small"}, " — " + label(metric)),
      ], {wide: true});
      p.box.dataset.run = r.run;
      p.box.dataset.metric = metric;
      p.box.dataset.rows = String(v && !(v instanceof Error) ? v.L : 0);
      p.box.dataset.maxRows = String(maxRows());
      if (v == null) return panels.notice(p, `Run “${r.run}” has ${missingText(r, metric)}.`);
      if (v instanceof Error) return panels.notice(p, `Could not load ${metric} for “${r.run}”: ${v.message}`, "error");
      if (!v.B || !v.L) return panels.notice(p, `Run “${r.run}” has no ${metric} values yet.`);
      const cols = [];
      for (let j = 0; j < v.L; j++) {
        if (match(v.layers[j]) || match(v.layerTypes[j] || "") || (v.group(j) && match(v.group(j).label))) cols.push(j);
      }
      shown = Math.max(shown, cols.length);
      total = Math.max(total, v.L);
      anyGroups = anyGroups || !!v.groups?.some((g) => g);
      if (!cols.length) return panels.notice(p, `No layer of “${r.run}” matches “${search}”.`);
      const shapes = [];
      const step = app.state.step;
      if (step && step.lo <= v.lastStep && step.hi >= v.firstStep) {
        shapes.push({type: "line", xref: "x", yref: "paper", x0: step.lo, x1: step.lo, y0: 0, y1: 1,
                     line: {color: ACCENT, width: 2}});
      }
      // One frame around each run of adjacent chosen rows.
      cols.forEach((j, row) => {
        if (!chosen(app, r.run, v, j)) return;
        const last = shapes.at(-1);
        if (last && last.type === "rect" && last.y1 === row - 0.5) last.y1 = row + 0.5;
        else {
          shapes.push({type: "rect", xref: "paper", yref: "y", x0: 0, x1: 1, y0: row - 0.5, y1: row + 0.5,
                       line: {color: ACCENT, width: 2}, fillcolor: "rgba(0,0,0,0)"});
        }
      });
      // Same data, same look: only the selection marks move (a 500 x 600
      // heatmap takes a while to rebuild and redraw).
      const sig = [metric, search, app.dark, cols.join(","), app.runColor(r.run), [...expanded].sort().join(",")].join("|");
      if (p.hasPlot && p.data && p.data.v === v && p.sig === sig) {
        p.note.append(el("span", {class: "muted small"}, p.noteText));
        window.Plotly.relayout(p.chart, {shapes});
        return;
      }
      const labels = cols.map((j) => layerLabel(v, j, !!v.group(j) && rowBad(v, j)));
      const {traces, anyBad, badRows, firstBad} = heatmapTraces(v, cols, labels, {scale: info.scale, metricLabel: label(metric), colorscale: colorscale(metric)});
      const nGroups = cols.filter((j) => v.group(j)).length;
      const notes = [`${v.numSteps} logged step${v.numSteps === 1 ? "" : "s"} (${v.firstStep}–${v.lastStep}), ` +
        (nGroups ? `${v.numLayers} layers in ${cols.length} rows: click a ▸ group to open it (colour is the group mean, ` +
                   "hover and profile show its min–max)" : `${cols.length} layers`)];
      if (v.binned) notes.push(`steps binned to ${v.B} columns: colour is the bin mean, hover and profile show the range`);
      if (info.scale === "log") notes.push("log colour scale");
      // named in words too: one NaN cell of 500 x 600 is a pixel or two
      if (anyBad) notes.push(`NaN/Inf (magenta) in ${badRows} layer${badRows > 1 ? "s" : ""}, first at step ${firstBad}`);
      if (v.numSteps === 1) notes.push("only one logged step so far: the heatmap fills in as training goes on");
      p.noteText = notes.join(" · ");
      p.note.append(el("span", {class: "muted small"}, p.noteText));
      p.sig = sig;
      p.data = {v, cols};
      // Margins that hold the row labels and the colour bar (its ticks are short numbers): with Plotly's
      // automargin every heatmap with new labels was drawn twice.
      const tickSize = cols.length > 40 ? 9 : 11;
      const left = Math.min(Math.round(0.45 * width), 14 + Math.round(1.1 * textWidth(labels, tickSize)));
      panels.plot(p, traces, layout(t, {
        height: heatmapHeight(cols.length),
        margin: {l: left, r: 72, t: 6, b: 40},
        uirevision: `${metric}|${search}`,
        xaxis: {title: {text: "step"}, showgrid: false, zeroline: false, automargin: false},
        yaxis: {type: "category", autorange: "reversed", showgrid: false, tickfont: {size: tickSize}, automargin: false},
        shapes,
      }), `${r.run}_${metric}`);
      if (!p.clickBound) {
        p.clickBound = true;
        p.chart.on("plotly_click", (ev) => {
          const pt = ev.points && ev.points[0];
          if (!pt || !p.data || !Array.isArray(pt.pointIndex)) return;
          const [row, col] = pt.pointIndex;
          const {v: cur, cols: cc} = p.data;
          if (row >= cc.length || col >= cur.B) return;
          const name = cur.layers[cc[row]];
          if (cur.group(cc[row])) {
            expanded.add(name); // a group opens in place; its cells stay where they are
            app.render();
            return;
          }
          app.select({step: {lo: cur.stepFirst[col], hi: cur.stepLast[col]}, layer: moduleOf(name, kind), layerRun: r.run});
        });
      }
    });
    countNote.textContent = search ? `${shown} of ${total} ${anyGroups ? "rows" : "layers"} match` : "";
    collapseButton.hidden = expanded.size === 0;
    await renderProfile(app, ctx, runs, data, match, profile);
    panels.end();
  };

  // The step the profile shows, before any data is here: the chosen one, else the last logged step of the
  // metric in the first run that has it (from the run list); null when neither is known.
  function profileStep(app, runs) {
    if (app.state.step) return app.state.step;
    const r = runs.find((x) => hasMetric(x, metric));
    const last = r?.last_steps?.[needsOf(metric)[0]];
    return Number.isFinite(last) ? {lo: last, hi: last} : null;
  }

  // {step, rows}: the profile's step and each run's values there (a promise), for the runs `want`s.
  function profileRows(app, runs, want, reveals, step) {
    const rows = Promise.all(runs.map((r, k) => (want[k]
      ? fetchMetric(r.run, metric, {start: step.lo, end: step.hi, points: 1, ...rowsOpts(reveals[k])}, ratios)
        .catch((e) => e) : null)));
    return {step, rows};
  }

  async function renderProfile(app, ctx, runs, data, match, profile) {
    const t = app.theme();
    const info = METRICS[metric];
    const p = panels.panel(`${id}:profile`, [el("h3", {}, profileTitle), el("span", {class: "muted small profile-step"})], {wide: true});
    if (!profile) return panels.notice(p, "No data to profile.");
    const step = profile.step;
    p.box.dataset.stepLo = String(step.lo);
    p.box.dataset.stepHi = String(step.hi);
    p.head.querySelector(".profile-step").textContent = step.lo === step.hi
      ? ` at step ${step.lo}${app.state.step ? "" : " (latest; click a heatmap cell to choose)"}`
      : ` over steps ${step.lo}–${step.hi} (bin mean, bars show min–max)`;
    const rows = await profile.rows;
    if (ctx.stale()) return;
    // Layers line up by name across runs, in the first run's model order.
    const order = [];
    const seen = new Set();
    const typeOf = new Map();
    const groupOf = new Map();
    for (const v of rows) {
      if (!v || v instanceof Error) continue;
      v.layers.forEach((n, j) => {
        const g = v.group(j);
        if (!seen.has(n) && (match(n) || match(v.layerTypes[j] || "") || (g && match(g.label)))) {
          seen.add(n);
          order.push(n);
          typeOf.set(n, v.layerTypes[j]);
          if (g) groupOf.set(n, g);
        }
      });
    }
    const labelOf = (n) => {
      const g = groupOf.get(n);
      if (g) return esc(`▸ ${g.label} (${g.members})`);
      return esc(kind === "site" && typeOf.get(n) ? `${n} · ${typeOf.get(n)}` : n);
    };
    const traces = [];
    const bad = {x: [], text: []};
    const missing = [];
    runs.forEach((r, k) => {
      const v = rows[k];
      if (!v || v instanceof Error || !v.B) {
        if (data[k] && !(data[k] instanceof Error)) missing.push(r.run);
        return;
      }
      const x = [];
      const y = [];
      const lo = [];
      const hi = [];
      const sizes = [];
      for (const n of order) {
        const j = v.layerIndex(n);
        if (j < 0 || !v.has(0, j)) continue;
        const val = v.at(0, j);
        x.push(labelOf(n));
        if (v.bad(0, j) && !Number.isFinite(val)) {
          y.push(null);
          bad.x.push(labelOf(n));
          bad.text.push(esc(r.run));
        } else {
          y.push(val);
          if (v.bad(0, j)) {
            bad.x.push(labelOf(n));
            bad.text.push(esc(r.run));
          }
        }
        lo.push(Number.isFinite(v.at(0, j, "min")) ? Math.max(0, val - v.at(0, j, "min")) : 0);
        hi.push(Number.isFinite(v.at(0, j, "max")) ? Math.max(0, v.at(0, j, "max") - val) : 0);
        sizes.push(app.isChosen(r.run, n, kind) ? 11 : 6);
      }
      const color = app.runColor(r.run);
      const tr = {type: "scatter", mode: "lines+markers", name: esc(r.run), x, y, line: {color, width: 1.5}, meta: {run: r.run, role: "value"},
                  marker: {color, size: sizes}, connectgaps: false,
                  hovertemplate: `${esc(r.run)}<br>%{x}<br>${esc(label(metric))} = %{y:.4g}<extra></extra>`};
      if (v.binned) tr.error_y = {type: "data", symmetric: false, array: hi, arrayminus: lo, color: alpha(color, 0.5), thickness: 1, width: 2};
      traces.push(tr);
    });
    if (bad.x.length) {
      traces.push({type: "scatter", mode: "markers", name: "non-finite", x: bad.x, y: bad.x.map(() => 0.96), yaxis: "y2",
                   text: bad.text, marker: {symbol: "x", size: 10, color: NONFINITE},
                   hovertemplate: "%{text}<br>%{x}<br>NaN/Inf at this step<extra></extra>"});
    }
    if (missing.length) p.note.append(el("span", {class: "muted small"}, `No logged step in this range for: ${missing.join(", ")}. `));
    if (!traces.length) return panels.notice(p, "No run has a value at this step.");
    const logY = info.scale === "log";
    let lo = Infinity;
    let hi = 0;
    for (const tr of traces) for (const y of tr.yaxis ? [] : tr.y) if (y > 0) [lo, hi] = [Math.min(lo, y), Math.max(hi, y)];
    // The bottom margin holds the layer labels, slanted when there are many (see the heatmap's margins).
    const names = order.map(labelOf);
    const tickSize = order.length > 40 ? 9 : 11;
    const slant = order.length > 12;
    // (at most what leaves the plot 100 px, as Plotly's automargin would)
    const below = Math.min(180, slant ? Math.round(0.75 * textWidth(names, tickSize) + tickSize) : tickSize + 4);
    panels.plot(p, traces, layout(t, {
      height: 300,
      margin: {l: 60, r: 16, t: 8, b: 12 + below},
      showlegend: runs.length > 1 || bad.x.length > 0,
      legend: {orientation: "h", y: 1.08, x: 0, font: {size: 11}},
      uirevision: `${metric}|${search}`,
      xaxis: {type: "category", tickangle: slant ? -45 : 0, tickfont: {size: tickSize}, automargin: false,
              categoryorder: "array", categoryarray: names},
      // decades once the values span two of them, else 1-2-5 (not every digit), and Plotly's own ticks
      // within a factor of 5, where 1-2-5 can leave none
      // a fraction stays on 0-1 (all zeros would otherwise autorange to -1..1)
      yaxis: {type: logY ? "log" : "linear", title: {text: esc(label(metric))}, exponentformat: "power",
              dtick: logY ? (hi / lo >= 100 ? 1 : hi / lo >= 5 ? "D2" : undefined) : undefined, range: info.scale === "unit" ? [-0.02, 1.02] : undefined},
      yaxis2: nonfiniteAxis(),
    }), `${metric}_profile`);
    p.data = {order, groups: groupOf};
    if (!p.clickBound) {
      p.clickBound = true;
      p.chart.on("plotly_click", (ev) => {
        const pt = ev.points && ev.points[0];
        if (!pt || !p.data) return;
        const n = p.data.order.find((o) => labelOf(o) === pt.x);
        const run = pt.data.meta?.run;
        if (n != null && p.data.groups.has(n)) {
          expanded.add(n);
          app.render();
        } else if (n != null) app.select({layer: moduleOf(n, kind), layerRun: run ?? null});
      });
    }
    if (app.state.layer != null) {
      p.head.append(el("button", {type: "button", class: "btn", onclick: () => app.select({view: "layer"})},
                       `Open layer “${app.state.layer || "(root)"}” ›`));
    }
  }

  return view;
}
