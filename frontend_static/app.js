// The Diagnostics tab: run selection, view switching, shared selection
// (layer, step), theme and live polling. Each view lives in views/*.js.
import * as api from "./api.js";
import {el, clear, message} from "./dom.js";
import {assignRunColours, runColorFor, theme, warmUp} from "./charts.js";
import {moduleOf} from "./metrics.js";
import overview from "./views/overview.js";
import gradients from "./views/gradients.js";
import activations from "./views/activations.js";
import loss from "./views/loss.js";
import model from "./views/model.js";
import layer from "./views/layer.js";

const VIEWS = [overview, gradients, activations, loss, model, layer];
const POLL_MS = 5000;
const MAX_DEFAULT_RUNS = 6;

class App {
  constructor(body) {
    this.body = body;
    this.state = {
      runs: [], // [{run, metrics, has_structure, problems}] in the server's order
      selected: new Set(),
      view: "overview",
      layer: null, // a module (or parameter / activation-site) name
      layerRun: null, // the run that layer was chosen in (null: the same name in every selected run)
      marked: null, // {run, layers}: the exact layers a clicked finding names, in its own run
      step: null, // {lo, hi}: the step (or bin of steps) chosen in a heatmap
      live: true,
      lastUpdate: null,
    };
    this.gen = 0;
    this.views = new Map();
    this.dark = detectDark();
  }

  // ------------------------------------------------------------ shell
  start() {
    document.documentElement.dataset.theme = this.dark ? "dark" : "light";
    clear(this.body);
    this.runList = el("div", {class: "run-list", role: "group", "aria-label": "Runs"});
    this.runFilter = el("input", {type: "search", class: "run-filter", placeholder: "Filter runs (regex)",
                                  "aria-label": "Filter runs", oninput: () => this.drawRuns()});
    this.status = el("div", {class: "live-status", "aria-live": "polite"});
    const liveBox = el("input", {type: "checkbox", checked: true, onchange: (e) => {
      this.state.live = e.target.checked;
      this.drawStatus();
    }});
    const sidebar = el("aside", {class: "sidebar"},
      el("div", {class: "side-title"}, "Runs"),
      this.runFilter,
      el("div", {class: "run-actions"},
        el("button", {class: "link", type: "button", onclick: () => this.selectRuns(this.visibleRuns())}, "all"),
        el("button", {class: "link", type: "button", onclick: () => this.selectRuns([])}, "none")),
      this.runList,
      el("div", {class: "side-foot"},
        el("label", {class: "live-toggle"}, liveBox, " Live update"),
        this.status));
    this.tabs = el("nav", {class: "view-tabs", role: "tablist"});
    this.content = el("div", {class: "views"});
    for (const v of VIEWS) {
      const root = el("div", {class: "view", dataset: {view: v.id, state: "idle"}, role: "tabpanel", hidden: true});
      this.content.append(root);
      this.views.set(v.id, {mod: v, root, inited: false});
      this.tabs.append(el("button", {type: "button", role: "tab", class: "view-tab", dataset: {tab: v.id},
                                      onclick: () => this.select({view: v.id})}, v.title));
    }
    this.banner = el("div", {class: "banner"});
    this.problemsBox = el("div", {class: "run-problems", hidden: true});
    api.onProblems(() => this.drawProblems());
    this.body.append(el("div", {class: "app"}, sidebar,
                        el("main", {class: "main"}, this.tabs, this.banner, this.problemsBox, this.content)));
    window.tbDiag = this; // handy from the console and for tests
    this.watchTheme();
    window.addEventListener("resize", () => this.onResize());
    this.refreshRuns(true).then(() => this.render());
    setInterval(() => this.poll(), POLL_MS);
  }

  watchTheme() {
    const apply = () => {
      const dark = detectDark();
      if (dark !== this.dark) {
        this.dark = dark;
        document.documentElement.dataset.theme = dark ? "dark" : "light";
        this.render();
      }
    };
    try {
      const pb = window.parent !== window && window.parent.document.body;
      if (pb) new MutationObserver(apply).observe(pb, {attributes: true, attributeFilter: ["class"]});
    } catch (e) {
      // cross-origin parent: fall back to the media query only
    }
    window.matchMedia("(prefers-color-scheme: dark)").addEventListener("change", apply);
  }

  onResize() {
    clearTimeout(this.resizeTimer);
    this.resizeTimer = setTimeout(() => {
      const v = this.views.get(this.state.view);
      for (const gd of v.root.querySelectorAll(".js-plotly-plot")) window.Plotly.Plots.resize(gd);
    }, 150);
  }

  theme() {
    return theme(this.dark);
  }

  // ------------------------------------------------------------- runs
  async refreshRuns(first = false) {
    let body;
    try {
      body = await api.runs();
    } catch (e) {
      this.runsError = `Could not list runs: ${e.message}`;
      this.showBanner(this.runsError, "error");
      return false;
    }
    if (this.runsError) {
      this.runsError = null;
      this.showBanner(null);
    }
    const before = new Set(this.state.runs.map((r) => r.run));
    const changed = body.runs.length !== this.state.runs.length ||
      body.runs.some((r, i) => r.run !== this.state.runs[i]?.run || r.metrics.length !== this.state.runs[i]?.metrics.length ||
                              r.problems.join("\n") !== this.state.runs[i]?.problems.join("\n"));
    this.state.runs = body.runs;
    assignRunColours(body.runs.map((r) => r.run));
    const names = new Set(body.runs.map((r) => r.run));
    for (const r of [...this.state.selected]) if (!names.has(r)) this.state.selected.delete(r);
    if (first || before.size === 0) {
      // the first runs to appear are shown; later, only the user's choice counts
      for (const r of body.runs.slice(0, MAX_DEFAULT_RUNS)) this.state.selected.add(r.run);
    } else {
      // a run that appears while the tab is open joins the comparison
      for (const r of body.runs) if (!before.has(r.run) && this.state.selected.size < MAX_DEFAULT_RUNS) this.state.selected.add(r.run);
    }
    if (changed || first) {
      this.drawRuns();
      this.drawProblems();
    }
    return changed;
  }

  visibleRuns() {
    const q = this.runFilter.value.trim();
    if (!q) return this.state.runs.map((r) => r.run);
    let re;
    try {
      re = new RegExp(q, "i");
    } catch (e) {
      re = null;
    }
    return this.state.runs.map((r) => r.run).filter((n) => (re ? re.test(n) : n.toLowerCase().includes(q.toLowerCase())));
  }

  drawRuns() {
    clear(this.runList);
    const visible = new Set(this.visibleRuns());
    if (!this.state.runs.length) {
      this.runList.append(el("div", {class: "muted small"}, "No runs with diagnostics yet."));
      return;
    }
    this.state.runs.forEach((r, i) => {
      if (!visible.has(r.run)) return;
      const id = "run-" + i;
      const box = el("input", {type: "checkbox", id, checked: this.state.selected.has(r.run), onchange: (e) => {
        if (e.target.checked) this.state.selected.add(r.run);
        else this.state.selected.delete(r.run);
        this.state.layerRun = null; // a new choice of runs asks for a comparison
        this.render();
      }});
      const row = el("div", {class: "run-row", dataset: {run: r.run}},
        box,
        el("span", {class: "swatch", style: {background: this.runColor(r.run)}}),
        el("label", {for: id, class: "run-name", title: r.run}, r.run),
        r.problems.length ? el("span", {class: "run-warn", title: r.problems.join("\n"),
                                        "aria-label": `${r.problems.length} data problem(s)`}, "⚠") : el("span"),
        el("button", {type: "button", class: "link only", title: "Show only this run", onclick: () => this.selectRuns([r.run])}, "only"));
      this.runList.append(row);
    });
  }

  selectRuns(names) {
    this.state.selected = new Set(names);
    this.state.layerRun = null;
    this.drawRuns();
    this.render();
  }

  // What the selected runs hold that cannot be shown: skipped tags, damaged
  // event files (from /runs) and steps skipped while reading a metric (/values).
  drawProblems() {
    const rows = [];
    for (const r of this.selectedRuns()) {
      const all = [...new Set([...r.problems, ...api.problemsOf(r.run)])];
      for (const p of all.slice(0, 20)) rows.push(el("li", {}, el("span", {class: "run-ref"}, r.run), ": ", p));
      if (all.length > 20) rows.push(el("li", {}, el("span", {class: "run-ref"}, r.run), `: and ${all.length - 20} more`));
    }
    clear(this.problemsBox);
    this.problemsBox.hidden = !rows.length;
    if (!rows.length) return;
    this.problemsBox.append(el("details", {open: true, role: "status"},
      el("summary", {}, `Some recorded data cannot be shown (${rows.length})`),
      el("ul", {}, rows)));
  }

  runColor(run) {
    return runColorFor(run);
  }

  // Selected runs in the server's (stable) order.
  selectedRuns() {
    return this.state.runs.filter((r) => this.state.selected.has(r.run));
  }

  // Whether layer `name` of `run` is what the user chose: the layers a clicked finding names (in its
  // run), else the chosen module's members (in the run it was chosen in, or in every run).
  isChosen(run, name, kind) {
    const {marked, layer, layerRun} = this.state;
    if (marked) return marked.run === run && marked.layers.includes(name);
    return layer != null && (layerRun == null || layerRun === run) && moduleOf(name, kind) === layer;
  }

  // --------------------------------------------------------- selection
  select(patch) {
    // A layer chosen by hand replaces the marks of a finding (and, unless it says, its run).
    if ("layer" in patch && !("marked" in patch)) this.state.marked = null;
    if ("layer" in patch && !("layerRun" in patch)) this.state.layerRun = null;
    Object.assign(this.state, patch);
    this.render();
  }

  // Switch to a view with one of its metrics chosen (from a finding, a node).
  openMetric(viewId, metric, patch = {}) {
    const v = this.views.get(viewId);
    if (metric && v && v.mod.setMetric) v.mod.setMetric(metric);
    this.select({...patch, view: viewId});
  }

  // ------------------------------------------------------------ render
  async render(live = false) {
    const token = ++this.gen;
    for (const b of this.tabs.children) {
      const on = b.dataset.tab === this.state.view;
      b.classList.toggle("active", on);
      b.setAttribute("aria-selected", String(on));
    }
    const v = this.views.get(this.state.view);
    for (const [id, other] of this.views) other.root.hidden = id !== this.state.view;
    if (!v.inited) {
      v.mod.init(v.root, this);
      v.inited = true;
    }
    if (!this.runsError) this.showBanner(null);
    this.drawProblems();
    if (!this.state.runs.length) {
      v.root.dataset.state = "ready";
      if (this.runsError) return;
      this.showBanner(
        "No diagnostics recorded yet. Add `Diagnostics(model, writer)` to your training loop and call " +
        "`diag.step(step, loss=loss)` after backward(); this tab updates as runs appear.", "info");
      return;
    }
    if (!live) v.root.dataset.state = "loading";
    try {
      await v.mod.render(this, {token, live, stale: () => token !== this.gen});
      if (token === this.gen) {
        v.root.dataset.state = "ready";
        v.root.dataset.renders = String(Number(v.root.dataset.renders || 0) + 1);
        this.warmWhenIdle();
      }
    } catch (e) {
      if (token !== this.gen) return;
      v.root.dataset.state = "error";
      this.showBanner(`This view failed: ${e && e.message ? e.message : e}`, "error");
      throw e;
    }
  }

  // Once, after the first view is drawn: Plotly's one-off costs paid while the user reads it
  // (charts.warmUp). `document.body.dataset.plotly` says when that is done.
  warmWhenIdle() {
    if (this.warming) return;
    this.warming = true;
    const idle = window.requestIdleCallback || ((fn) => setTimeout(fn, 50));
    idle(async () => {
      document.body.dataset.plotly = await warmUp(this.theme());
    }, {timeout: 1000});
  }

  showBanner(text, kind = "info") {
    clear(this.banner);
    if (text) this.banner.append(message(text, kind));
  }

  drawStatus() {
    const t = this.state.lastUpdate;
    clear(this.status).append(
      this.state.live ? `Polling every ${POLL_MS / 1000} s` : "Live update paused",
      t ? el("br") : "", t ? `Data as of ${t.toLocaleTimeString()}` : "");
  }

  // --------------------------------------------------------- live poll
  async poll() {
    if (!this.state.live || this.polling) return;
    this.polling = true;
    try {
      let changed = await this.refreshRuns();
      const runs = this.selectedRuns();
      // Only the metrics whose data version changed are fetched again (issue 24.3).
      const dropped = await Promise.all(runs.map((r) => api.refresh(r.run).catch(() => false)));
      if (dropped.some(Boolean)) changed = true;
      this.state.lastUpdate = new Date();
      this.drawStatus();
      if (changed) await this.render(true);
    } finally {
      this.polling = false;
    }
  }
}

function detectDark() {
  try {
    const pb = window.parent !== window && window.parent.document.body;
    if (pb) return pb.classList.contains("dark-mode");
  } catch (e) {
    // not reachable: use the media query
  }
  return window.matchMedia("(prefers-color-scheme: dark)").matches;
}

export function start(body) {
  const app = new App(body);
  app.start();
  return app;
}
