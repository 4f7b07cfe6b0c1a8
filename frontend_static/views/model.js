// Model: the module tree from the structure summary, each node coloured by
// its worst current diagnostic; a click opens the layer's series.
import * as api from "../api.js";
import {el, clear, fmt, fmtCount, fmtPct, message} from "../dom.js";
import {moduleOf} from "../metrics.js";

let runSel;
let chosen = null;
let body;
let legend;

const RANK = {ok: 0, info: 1, warning: 2, error: 3};
const SEV_TEXT = {ok: "ok", info: "note", warning: "warning", error: "error"};

function init(root, app) {
  runSel = el("select", {"aria-label": "Run", onchange: (e) => {
    chosen = e.target.value;
    app.render();
  }});
  legend = el("span", {class: "legend"}, ["ok", "info", "warning", "error"].map((s) =>
    el("span", {class: `legend-chip`}, el("span", {class: `chip-box st-${s}`}), SEV_TEXT[s])));
  body = el("div", {class: "model-body"});
  root.append(
    el("div", {class: "toolbar"}, el("label", {class: "tool"}, "Run ", runSel), legend),
    el("p", {class: "intro muted"}, "The model's modules in order, with their type, parameter count and shapes. " +
       "Each node is coloured by the worst diagnostic at the latest logged step (its own or its children's). " +
       "Click a node to open its series."),
    body);
}

// The module list: from the structure summary, or (without one) from the
// layer names of the recorded metrics.
function modulesFromTags(tags) {
  const mods = new Map();
  const get = (name) => {
    if (!mods.has(name)) mods.set(name, {name, type: "", num_params: null, params: [], sites: []});
    return mods.get(name);
  };
  get("");
  for (const [metric, info] of Object.entries(tags.metrics || {})) {
    if (metric === "grad_norm" || metric === "weight_norm") {
      for (const n of info.layers) {
        const m = get(moduleOf(n, "param"));
        if (!m.params.some((p) => p.name === n)) m.params.push({name: n, shape: null, numel: null, tracked: true});
      }
    }
    if (["dead_fraction", "saturation", "act_mean", "act_std"].includes(metric)) {
      info.layers.forEach((n, j) => {
        const m = get(moduleOf(n, "site"));
        if (!m.sites.some((s) => s.name === n)) m.sites.push({name: n, type: info.layer_types[j] || "", kind: ""});
      });
    }
  }
  return [...mods.values()];
}

async function latest(run, metrics) {
  const want = ["grad_norm", "grad_nonfinite", "weight_norm", "update_ratio", "dead_fraction", "saturation", "act_mean"];
  const out = {};
  await Promise.all(want.filter((m) => metrics.includes(m)).map(async (m) => {
    try {
      out[m] = await api.values(run, m, {points: 200});
    } catch (e) {
      out[m] = null;
    }
  }));
  return out;
}

// The worst diagnostic of one parameter or activation site at the last row.
function diagnose(vals, name, kind) {
  const issues = [];
  const get = (m) => {
    const v = vals[m];
    if (!v || !v.B) return null;
    const j = v.layerIndex(name);
    if (j < 0 || !v.has(v.B - 1, j)) return null;
    return {x: v.at(v.B - 1, j), bad: v.bad(v.B - 1, j)};
  };
  if (kind === "param") {
    const g = get("grad_norm");
    const nf = get("grad_nonfinite");
    const w = get("weight_norm");
    const u = get("update_ratio");
    if ((g && g.bad) || (nf && nf.x > 0)) issues.push(["error", "non-finite gradient"]);
    if (w && w.bad) issues.push(["error", "non-finite weights"]);
    if (g && !g.bad && g.x < 1e-7) issues.push(["warning", `vanishing gradient (‖g‖ ${fmt(g.x, 2)})`]);
    if (g && !g.bad && g.x > 1e3) issues.push(["warning", `large gradient (‖g‖ ${fmt(g.x, 2)})`]);
    if (u && !u.bad && u.x > 0.1) issues.push(["warning", `large updates (‖Δw‖/‖w‖ ${fmt(u.x, 2)})`]);
    if (!issues.length && g) issues.push(["ok", `‖g‖ ${fmt(g.x, 3)}`]);
  } else {
    const d = get("dead_fraction");
    const s = get("saturation");
    const a = get("act_mean");
    if ((a && a.bad) || (d && d.bad) || (s && s.bad)) issues.push(["error", "non-finite activations (statistics unknown)"]);
    if (d && d.x >= 0.9) issues.push(["error", `${fmtPct(d.x)} dead`]);
    else if (d && d.x >= 0.5) issues.push(["warning", `${fmtPct(d.x)} dead`]);
    if (s && s.x >= 0.5) issues.push(["warning", `${fmtPct(s.x)} saturated`]);
    if (!issues.length && d && !d.bad) issues.push(["ok", `${fmtPct(d.x)} dead`]);
    if (!issues.length && s && !s.bad) issues.push(["ok", `${fmtPct(s.x)} saturated`]);
  }
  return issues;
}

function worst(issues) {
  let best = null;
  for (const i of issues) if (!best || RANK[i[0]] > RANK[best[0]]) best = i;
  return best;
}

async function render(app, ctx) {
  const runs = app.selectedRuns();
  clear(runSel);
  if (!runs.length) {
    clear(body).append(message("Select a run on the left.", "info"));
    return;
  }
  if (!runs.some((r) => r.run === chosen)) chosen = (runs.find((r) => r.has_structure) || runs[0]).run;
  for (const r of runs) runSel.append(el("option", {value: r.run, selected: r.run === chosen}, r.run));
  runSel.value = chosen;
  const run = runs.find((r) => r.run === chosen);
  // The tree does not wait for the findings: it is drawn from what is ready, and again with their verdicts.
  const findings = api.findings(run.run).catch(() => null);
  const [struct, tags, vals] = await Promise.all([
    run.has_structure ? api.structure(run.run).catch((e) => e) : Promise.resolve(null),
    api.tags(run.run).catch((e) => e),
    latest(run.run, run.metrics),
  ]);
  if (ctx.stale()) return;
  const early = await Promise.race([findings, Promise.resolve(PENDING)]);
  draw(app, run, struct, tags, vals, early === PENDING ? null : early);
  if (early !== PENDING) return;
  body.dataset.findings = "pending";
  const found = await findings;
  if (ctx.stale()) return;
  draw(app, run, struct, tags, vals, found);
}

const PENDING = Symbol("pending");

function draw(app, run, struct, tags, vals, found) {
  body.dataset.findings = found ? "ready" : "unavailable";
  const notes = [];
  let modules;
  if (struct && !(struct instanceof Error) && struct.structure && Array.isArray(struct.structure.modules)) {
    modules = struct.structure.modules;
  } else {
    notes.push(struct instanceof Error
      ? `The model structure of “${run.run}” could not be read (${struct.message}); showing the recorded layers instead.`
      : `“${run.run}” has no model structure summary; showing the modules its recorded layers belong to.`);
    modules = tags instanceof Error ? [] : modulesFromTags(tags);
  }
  // Findings name layers; fold them into their modules' status.
  const fromFindings = new Map();
  for (const f of (found && found.findings) || []) {
    for (const n of f.layers || []) {
      const kind = f.kind === "dead_relu" || f.kind === "saturated_activation" ? "site" : "param";
      const m = moduleOf(n, kind);
      const list = fromFindings.get(m) || [];
      list.push([f.severity === "error" || f.severity === "warning" || f.severity === "info" ? f.severity : "info",
                 String(f.message || f.kind)]);
      fromFindings.set(m, list);
    }
  }
  const own = new Map();
  for (const m of modules) {
    const issues = [];
    for (const p of m.params || []) issues.push(...diagnose(vals, p.name, "param").map(([s, t]) => [s, `${p.name.split(".").pop()}: ${t}`]));
    for (const s of m.sites || []) issues.push(...diagnose(vals, s.name, "site"));
    issues.push(...(fromFindings.get(m.name) || []));
    own.set(m.name, issues);
  }
  const stepRef = Object.values(vals).find((v) => v && v.B);
  const tree = el("div", {class: "tree", role: "tree"});
  for (const m of modules) {
    const depth = m.name === "" ? 0 : m.name.split(".").length;
    let agg = worst(own.get(m.name));
    for (const [n, issues] of own) {
      if (n === m.name || !(m.name === "" || n.startsWith(m.name + "."))) continue;
      const w = worst(issues);
      if (w && (!agg || RANK[w[0]] > RANK[agg[0]])) agg = [w[0], `${n}: ${w[1]}`];
    }
    const status = agg ? agg[0] : "none";
    const shapes = (m.params || []).map((p) => `${p.name.split(".").pop()} ${p.shape ? "[" + p.shape.join("×") + "]" : ""}${p.tracked === false ? " (not tracked)" : ""}`);
    const sites = (m.sites || []).filter((s) => s.name !== m.name).map((s) => `${s.name.slice(m.name.length).replace(/^\./, "")}: ${s.type}`);
    const row = el("button", {type: "button", role: "treeitem", class: `node st-${status}` + (app.state.layer === m.name ? " selected" : ""),
                              style: {paddingLeft: `${8 + depth * 18}px`}, dataset: {module: m.name, status},
                              onclick: () => app.select({layer: m.name, view: "layer"})},
      el("span", {class: "node-dot"}),
      el("span", {class: "node-name"}, m.name === "" ? "(model)" : m.name.split(".").pop()),
      el("span", {class: "node-type"}, m.type || ""),
      m.num_params != null ? el("span", {class: "node-params"}, `${fmtCount(m.num_params)} params`) : null,
      shapes.length ? el("span", {class: "node-shapes"}, shapes.join(" · ")) : null,
      sites.length ? el("span", {class: "node-shapes"}, sites.join(" · ")) : null,
      agg ? el("span", {class: `node-status st-${status}`, title: `${SEV_TEXT[agg[0]]}: ${agg[1]}`}, `${SEV_TEXT[agg[0]]}: ${agg[1]}`) : null);
    row.title = m.name === "" ? "(model)" : m.name;
    tree.append(row);
  }
  clear(body);
  for (const n of notes) body.append(message(n, "info"));
  if (stepRef) body.append(el("p", {class: "muted small"}, `Status at step ${stepRef.stepFirst[stepRef.B - 1]}` +
    (stepRef.binned ? `–${stepRef.stepLast[stepRef.B - 1]} (the latest bin)` : " (the latest logged step)")));
  if (!modules.length) body.append(message("No modules to show.", "info"));
  body.append(tree);
}

export default {id: "model", title: "Model", init, render};
