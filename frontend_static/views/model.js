// Model: the module tree from the structure summary, each node coloured by
// its worst current diagnostic, layers that went NaN/Inf marked as such; a
// click opens the layer's series in this run. The server (`/model`) folds
// the tree to the screen: groups of modules, unhealthy branches open, a
// group opened by a click.
import * as api from "../api.js";
import {el, clear, fmt, fmtCount, message} from "../dom.js";
import {SEVERITIES} from "../metrics.js";

let runSel;
let chosen = null;
// Groups of modules the user opened (keys from the server's /model answers), for the run they were opened in.
const expanded = new Set();
let expandedRun = null;
let body;
let legend;

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
       "children's), from the same rules as the Overview's findings; a module whose recorded values (gradients, " +
       "weights, activations) went NaN/Inf is marked so, from the step they first did. A model with more modules " +
       "than fit is shown in groups (▸, click to open), with the branches that hold a problem open. " +
       "Click a node to open its series."),
    body);
}

// As many rows as the screen has room for: the server groups the modules along the tree beyond that.
function maxRows() {
  return Math.max(16, Math.min(200, Math.floor(((window.innerHeight || 900) - 160) / 26)));
}

// What gets a row of its own: a clicked finding's layers (its run only; the server finds their modules),
// else the chosen module.
function revealed(app, run) {
  const {marked, layer, layerRun} = app.state;
  if (marked) return marked.run === run ? marked.layers.slice(0, 64) : [];
  return layer != null && (layerRun == null || layerRun === run) ? [layer] : [];
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
  if (expandedRun !== run.run) {
    expanded.clear();
    expandedRun = run.run;
  }
  // The tree does not wait for the findings: it is drawn from what is ready, and again with their verdicts.
  const opts = {maxRows: maxRows(), expand: [...expanded].sort(), reveal: revealed(app, run.run)};
  let answer = await api.model(run.run, opts).catch((e) => e);
  if (ctx.stale()) return;
  draw(app, run, answer);
  while (!(answer instanceof Error) && !answer.findings_complete) {
    answer = await api.model(run.run, {...opts, waitMs: 3000}).catch((e) => e);
    if (ctx.stale()) return;
    if (answer instanceof Error || answer.findings_complete) draw(app, run, answer);
  }
}

function shapeText(p) {
  return `${p.name.split(".").pop()} ${p.shape ? "[" + p.shape.join("×") + "]" : ""}${p.tracked === false ? " (not tracked)" : ""}`;
}

// `answer`: the /model answer (tb_diag_plugin/http_api.md) or an Error.
function draw(app, run, answer) {
  const notes = [];
  clear(body);
  if (answer instanceof Error) {
    body.dataset.findings = "unavailable";
    body.append(message(`The model of “${run.run}” could not be read (${answer.message}).`, "error"));
    return;
  }
  body.dataset.findings = answer.findings_complete ? "ready" : "pending";
  body.dataset.rows = String(answer.rows.length);
  body.dataset.modules = String(answer.num_modules);
  body.dataset.maxRows = String(answer.max_rows);
  if (answer.structure_problem) notes.push(`${answer.structure_problem}; showing the recorded layers instead.`);
  else if (!answer.has_structure) notes.push(`“${run.run}” has no model structure summary; showing the modules its recorded layers belong to.`);
  if (!answer.findings_complete) notes.push(`Analysing “${run.run}”: each node is coloured once its findings are ready.`);
  const groups = answer.rows.filter((r) => r.group).length;
  if (groups) {
    notes.push(`${answer.num_modules} modules in ${answer.rows.length} rows: click a ▸ group to open it ` +
               "(a group shows the worst status of its modules, ⚠ when one of them recorded a NaN/Inf)" +
               (answer.opened.length ? `; opened where something is wrong: ${answer.opened.slice(0, 6).join(", ")}` +
                                       (answer.opened.length > 6 ? ` +${answer.opened.length - 6} more` : "") : "") + ".");
  }
  const tree = el("div", {class: "tree", role: "tree"});
  for (const r of answer.rows) {
    const status = r.status;
    const grad = r.grad_norm;
    const gradText = grad && grad.count > 1
      ? `grad norm (step ${answer.grad_step}): mean ${fmt(grad.mean)}, ${fmt(grad.min)}–${fmt(grad.max)}` +
        (grad.nonfinite ? `, ${grad.nonfinite} NaN/Inf` : "")
      : null;
    const nonfinite = r.nonfinite.map(([n, step]) => `${n}@${step}`).join(" ");
    let row;
    if (r.group) {
      row = el("button", {type: "button", role: "treeitem", "aria-expanded": "false",
                          class: `node group st-${status}`, style: {paddingLeft: `${8 + r.depth * 18}px`},
                          dataset: {group: r.key, status, nonfinite, nonfiniteLayers: String(r.nonfinite_layers)},
                          onclick: () => {
                            expanded.add(r.key); // a group opens in place
                            app.render();
                          }},
        el("span", {class: "node-dot"}),
        el("span", {class: "node-name"}, `${r.nonfinite_layers ? "⚠ " : ""}▸ ${r.label}`),
        el("span", {class: "node-type"}, `${r.members} modules`),
        r.num_params != null ? el("span", {class: "node-params"}, `${fmtCount(r.num_params)} params`) : null,
        r.nonfinite_layers ? el("span", {class: "node-shapes"}, `${r.nonfinite_layers} layer${r.nonfinite_layers > 1 ? "s" : ""} NaN/Inf from step ${r.first_nonfinite}`) : null,
        gradText ? el("span", {class: "node-shapes"}, gradText) : null,
        r.why ? el("span", {class: `node-status st-${status}`, title: `${SEV_TEXT[status]}: ${r.why}`}, `${SEV_TEXT[status]}: ${r.why}`) : null);
    } else {
      const shapes = r.params.map(shapeText);
      if (r.more_params) shapes.push(`+${r.more_params} more`);
      const sites = r.sites.filter((s) => s.name !== r.key).map((s) => `${s.name.slice(r.key.length).replace(/^\./, "")}: ${s.type}`);
      if (r.more_sites) sites.push(`+${r.more_sites} more`);
      const chosenRow = app.state.layer === r.key && (app.state.layerRun == null || app.state.layerRun === run.run);
      row = el("button", {type: "button", role: "treeitem", class: `node st-${status}` + (chosenRow ? " selected" : ""),
                          style: {paddingLeft: `${8 + r.depth * 18}px`}, dataset: {module: r.key, status, nonfinite},
                          onclick: () => app.select({layer: r.key, view: "layer", layerRun: run.run})},
        el("span", {class: "node-dot"}),
        el("span", {class: "node-name"}, r.key === "" ? "(model)" : r.key.split(".").pop()),
        el("span", {class: "node-type"}, r.type || ""),
        r.num_params != null ? el("span", {class: "node-params"}, `${fmtCount(r.num_params)} params`) : null,
        shapes.length ? el("span", {class: "node-shapes"}, shapes.join(" · ")) : null,
        sites.length ? el("span", {class: "node-shapes"}, sites.join(" · ")) : null,
        r.why ? el("span", {class: `node-status st-${status}`, title: `${SEV_TEXT[status]}: ${r.why}`}, `${SEV_TEXT[status]}: ${r.why}`) : null);
    }
    row.title = r.group ? `${r.label}: click to open` : r.key === "" ? "(model)" : r.key;
    tree.append(row);
  }
  for (const n of notes) body.append(message(n, "info"));
  if (!answer.rows.length) body.append(message("No modules to show.", "info"));
  body.append(tree);
}

export default {id: "model", title: "Model", init, render};
