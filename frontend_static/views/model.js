// Model: the module tree from the structure summary, each node coloured by
// its worst current diagnostic, activation sites that went NaN/Inf marked as
// such; a click opens the layer's series in this run.
import * as api from "../api.js";
import {el, clear, fmtCount, message} from "../dom.js";
import {PARAM_METRICS, SEVERITIES, SITE_METRICS, moduleOf} from "../metrics.js";

let runSel;
let chosen = null;
let body;
let legend;

// "ok" below the contract's severities (worst first there); recorded NaN/Inf
// activations rank with the worst, a finding of that rank named first wins.
const RANK = {ok: 0, ...Object.fromEntries(SEVERITIES.map((s, i) => [s, SEVERITIES.length - i]))};
RANK.nonfinite = RANK[SEVERITIES[0]];
const SEV_TEXT = {ok: "ok", info: "note", warning: "warning", error: "error", nonfinite: "NaN/Inf"};

function init(root, app) {
  runSel = el("select", {"aria-label": "Run", onchange: (e) => {
    chosen = e.target.value;
    app.render();
  }});
  legend = el("span", {class: "legend"}, ["ok", ...[...SEVERITIES].reverse(), "nonfinite"].map((s) =>
    el("span", {class: `legend-chip`}, el("span", {class: `chip-box st-${s}`}), SEV_TEXT[s])));
  body = el("div", {class: "model-body"});
  root.append(
    el("div", {class: "toolbar"}, el("label", {class: "tool"}, "Run ", runSel), legend),
    el("p", {class: "intro muted"}, "The model's modules in order, with their type, parameter count and shapes. " +
       "Each node is coloured by the worst finding that names its parameters or activation sites (its own or its " +
       "children's), from the same rules as the Overview's findings; an activation site whose recorded values went " +
       "NaN/Inf is marked so, from the step it first did. " +
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
    if (PARAM_METRICS.includes(metric)) {
      for (const n of info.layers) {
        const m = get(moduleOf(n, "param"));
        if (!m.params.some((p) => p.name === n)) m.params.push({name: n, shape: null, numel: null, tracked: true});
      }
    }
    if (SITE_METRICS.includes(metric)) {
      info.layers.forEach((n, j) => {
        const m = get(moduleOf(n, "site"));
        if (!m.sites.some((s) => s.name === n)) m.sites.push({name: n, type: info.layer_types[j] || "", kind: ""});
      });
    }
  }
  return [...mods.values()];
}

// What the findings say about one module's own members: [severity, text] per layer they name.
function verdictsByModule(verdicts) {
  const out = new Map();
  for (const [name, v] of Object.entries(verdicts)) {
    if (!(v.severity in RANK)) continue;
    const kind = v.layer_kind;
    const mod = moduleOf(name, kind);
    const member = kind === "param" ? name.slice(mod ? mod.length + 1 : 0) : name;
    const kinds = (v.kinds || []).map((k) => String(k).replace(/_/g, " ")).join(", ");
    const list = out.get(mod) || [];
    list.push([v.severity, mod === name ? kinds : `${member}: ${kinds}`]);
    out.set(mod, list);
  }
  return out;
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
  const findings = api.findings(run.run).catch((e) => e);
  const [struct, tags, bad] = await Promise.all([
    run.has_structure ? api.structure(run.run).catch((e) => e) : Promise.resolve(null),
    api.tags(run.run).catch((e) => e),
    nonfiniteSites(run),
  ]);
  if (ctx.stale()) return;
  const early = await Promise.race([findings, Promise.resolve(PENDING)]);
  draw(app, run, struct, tags, early === PENDING ? null : early, bad);
  if (early !== PENDING) return;
  body.dataset.findings = "pending";
  const found = await findings;
  if (ctx.stale()) return;
  draw(app, run, struct, tags, found, bad);
}

// Activation sites with a NaN/Inf value in any site metric the run records: Map(site -> first step).
async function nonfiniteSites(run) {
  const out = new Map();
  const got = await Promise.all(SITE_METRICS.filter((m) => run.metrics.includes(m))
    .map((m) => api.values(run.run, m, {points: 400}).catch(() => null)));
  for (const v of got) {
    if (!v) continue;
    for (let j = 0; j < v.L; j++) {
      for (let i = 0; i < v.B; i++) {
        if (!v.has(i, j) || !v.bad(i, j)) continue;
        const n = v.layers[j];
        out.set(n, Math.min(out.get(n) ?? Infinity, v.stepFirst[i]));
        break;
      }
    }
  }
  return out;
}

const PENDING = Symbol("pending");

// `found`: the /findings answer, an Error, or null while it is pending; `bad`: nonfiniteSites().
function draw(app, run, struct, tags, found, bad) {
  const analysed = found != null && !(found instanceof Error);
  body.dataset.findings = analysed ? "ready" : found ? "unavailable" : "pending";
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
  // The findings' per-layer verdicts (the server's rules), folded into their modules.
  if (found instanceof Error) notes.push(`Findings for “${run.run}” are not available (${found.message}): nodes are not coloured.`);
  else if (!analysed) notes.push(`Analysing “${run.run}”: each node is coloured once its findings are ready.`);
  const fromFindings = verdictsByModule(analysed ? found.layers || {} : {});
  const own = new Map();
  const badOf = new Map(); // module -> [[site, first step]]
  for (const [n, step] of bad) badOf.set(moduleOf(n, "site"), [...(badOf.get(moduleOf(n, "site")) || []), [n, step]]);
  for (const m of modules) {
    const issues = [...(fromFindings.get(m.name) || [])];
    for (const [n, step] of badOf.get(m.name) || []) {
      issues.push(["nonfinite", `${n === m.name ? "" : `${n}: `}activations NaN/Inf from step ${step}`]);
    }
    const members = (m.params || []).filter((p) => p.tracked !== false).length + (m.sites || []).length;
    if (analysed && !issues.length && members) issues.push(["ok", "no findings"]);
    own.set(m.name, issues);
  }
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
    const nonfinite = (badOf.get(m.name) || []).map(([n, step]) => `${n}@${step}`).join(" ");
    const chosen = app.state.layer === m.name && (app.state.layerRun == null || app.state.layerRun === run.run);
    const row = el("button", {type: "button", role: "treeitem", class: `node st-${status}` + (chosen ? " selected" : ""),
                              style: {paddingLeft: `${8 + depth * 18}px`}, dataset: {module: m.name, status, nonfinite},
                              onclick: () => app.select({layer: m.name, view: "layer", layerRun: run.run})},
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
  if (!modules.length) body.append(message("No modules to show.", "info"));
  body.append(tree);
}

export default {id: "model", title: "Model", init, render};
