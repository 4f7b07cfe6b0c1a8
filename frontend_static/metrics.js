// What each recorded metric is, how to draw it, which view shows it, and which
// module a layer name belongs to. The names come from the server's /contract
// route (tb_diag_plugin/metadata.py, the one place they are defined).
import * as api from "./api.js";

const getJSON = api.getJSON;
const getJSONValues = api.values;

// Loaded once, before any view module runs (a top-level await: the app's
// imports wait for it).
export const CONTRACT = await getJSON("contract");

export const METRICS = Object.fromEntries(CONTRACT.metrics.map((m) => [m.name, m]));
const byLayerKind = (kind) => CONTRACT.metrics.filter((m) => m.layer_kind === kind).map((m) => m.name);
export const PARAM_METRICS = byLayerKind("param");
export const SITE_METRICS = byLayerKind("site");
export const MODULE_METRICS = byLayerKind("module");
export const PERCENTILES = CONTRACT.loss_spread_metrics;
export const OVERVIEW_METRICS = CONTRACT.overview_metrics;
export const SEVERITIES = CONTRACT.severities; // worst first
export const SEVERITY_RANK = Object.fromEntries(SEVERITIES.map((s, i) => [s, i]));
export const TOTAL_LOSS = CONTRACT.total_loss; // the loss layer of diag.step(loss=...)
export const ACTIVATION_KINDS = CONTRACT.activation_kinds;
// An activation site's name; its first group is the module the site belongs to.
const SITE_NAME = new RegExp(CONTRACT.site_name_pattern);

// The metrics a view's chart offers, in the contract's order.
export function viewMetrics(view) {
  return CONTRACT.metrics.filter((m) => m.view === view).map((m) => m.name);
}

// [view, metric or null] that a finding of `kind` opens.
export function findingTarget(kind) {
  const t = CONTRACT.finding_view[kind];
  return t ? [t.view, t.metric] : ["overview", null];
}

// The layer kind ("param", "site", ...) of a finding's layers when nothing more is known.
export function findingLayerKind(kind) {
  const metric = CONTRACT.finding_view[kind]?.metric;
  return METRICS[metric]?.layer_kind || "param";
}

export function label(metric) {
  return METRICS[metric] ? METRICS[metric].label : metric;
}

// The recorded metrics `metric` is drawn from (itself unless the tab derives it).
export function needsOf(metric) {
  const needs = METRICS[metric]?.needs;
  return needs && needs.length ? needs : [metric];
}

// Whether a run (an entry of /runs) can show `metric`.
export function hasMetric(run, metric) {
  return needsOf(metric).every((m) => run.metrics.includes(m));
}

export function missingText(run, metric) {
  const m = METRICS[metric];
  if (m?.missing) return m.missing;
  return `no ${needsOf(metric).filter((n) => !run.metrics.includes(n)).join(" or ")} recorded`;
}

// One metric of one run: recorded ones from /values, a derived one as the
// ratio of the two metrics it needs (`cache`, a WeakMap, keeps the ratio of
// the same inputs, so a re-render with the same data can skip redrawing).
export async function fetchMetric(run, metric, opts, cache = null) {
  const needs = METRICS[metric]?.needs || [];
  if (needs.length !== 2) return getJSONValues(run, metric, opts);
  const [g, w] = await Promise.all(needs.map((m) => getJSONValues(run, m, opts)));
  const hit = cache && cache.get(g);
  if (hit && hit.w === w) return hit.r;
  const r = api.ratio(g, w, metric);
  if (cache) cache.set(g, {w, r});
  return r;
}

// Whether the tab derives `metric` rather than reading it (no min/max bands).
export function isDerived(metric) {
  return (METRICS[metric]?.needs || []).length > 0;
}

// A diverging colour scale for values of either sign.
export function colorscale(metric) {
  return METRICS[metric]?.signed ? "Cividis" : undefined;
}

// The module a metric's layer belongs to: a parameter's owner ("0.weight" ->
// "0"), an activation site's module ("enc.relu()#2" -> "enc", by the contract's
// site_name_pattern); an activation module such as nn.ReLU is its own site, and
// a module-level metric's layer (the output head) is the module itself.
export function moduleOf(name, kind) {
  if (name == null) return null;
  if (kind === "module") return name;
  if (kind === "site") {
    const m = SITE_NAME.exec(name);
    return m ? m[1] || "" : name;
  }
  const dot = name.lastIndexOf(".");
  return dot >= 0 ? name.slice(0, dot) : "";
}
