// What each recorded metric is, how to draw it, and which module a layer
// name belongs to. Names follow DESIGN.md ("Metric names").

export const METRICS = {
  grad_norm: {label: "Gradient L2 norm", scale: "log", kind: "param"},
  grad_max_abs: {label: "Gradient max |g|", scale: "log", kind: "param"},
  grad_nonfinite: {label: "Non-finite gradient elements", scale: "linear", kind: "param"},
  weight_norm: {label: "Weight L2 norm", scale: "log", kind: "param"},
  update_ratio: {label: "Update ratio ‖Δw‖/‖w‖", scale: "log", kind: "param",
                 missing: "no update_ratio recorded (pass optimizer= to Diagnostics)"},
  grad_to_weight: {label: "Gradient-to-weight ratio ‖g‖/‖w‖", scale: "log", kind: "param", needs: ["grad_norm", "weight_norm"]},
  dead_fraction: {label: "Dead-unit fraction", scale: "unit", kind: "site",
                  missing: "no dead_fraction recorded (no ReLU-family activations were seen)"},
  saturation: {label: "Saturated fraction", scale: "unit", kind: "site",
               missing: "no saturation recorded (no sigmoid/tanh activations were seen)"},
  act_mean: {label: "Activation mean", scale: "linear", kind: "site", colorscale: "Cividis"},
  act_std: {label: "Activation std", scale: "log", kind: "site"},
  grad_norm_total: {label: "Total gradient norm", scale: "log", kind: "model"},
  grad_norm_preclip: {label: "Total gradient norm before clipping", scale: "log", kind: "model"},
  learning_rate: {label: "Learning rate", scale: "log", kind: "model"},
  amp_scale: {label: "AMP loss scale", scale: "log", kind: "model"},
  amp_skipped: {label: "AMP skipped steps", scale: "linear", kind: "model"},
  loss: {label: "Loss", scale: "linear", kind: "loss"},
  // Issue 15 (logger/optim_state.py, logits.py, diag.evaluate()).
  grad_missing: {label: "No gradient (.grad is None)", scale: "linear", kind: "param"},
  adam_eps_fraction: {label: "Adam: share of entries with √v̂ < eps", scale: "unit", kind: "param"},
  update_rms: {label: "Adam update RMS m̂/(√v̂+eps)", scale: "log", kind: "param"},
  logit_max_abs: {label: "Output logits max |z|", scale: "log", kind: "model"},
  logit_lse: {label: "Output logits mean log-sum-exp", scale: "linear", kind: "model"},
  val_loss: {label: "Validation loss", scale: "linear", kind: "loss"},
  val_metric: {label: "Validation metric", scale: "linear", kind: "model"},
};

export const PARAM_METRICS = ["grad_norm", "grad_max_abs", "grad_nonfinite", "weight_norm", "update_ratio", "grad_to_weight"];
export const SITE_METRICS = ["dead_fraction", "saturation", "act_mean", "act_std"];
export const PERCENTILES = ["loss_min", "loss_p05", "loss_p25", "loss_p50", "loss_p75", "loss_p95", "loss_max"];

export function label(metric) {
  return METRICS[metric] ? METRICS[metric].label : metric;
}

// Whether a run (an entry of /runs) can show `metric`.
export function hasMetric(run, metric) {
  const needs = METRICS[metric]?.needs || [metric];
  return needs.every((m) => run.metrics.includes(m));
}

export function missingText(run, metric) {
  const m = METRICS[metric];
  if (m?.missing) return m.missing;
  const needs = m?.needs || [metric];
  return `no ${needs.filter((n) => !run.metrics.includes(n)).join(" or ")} recorded`;
}

// The module a metric's layer belongs to: a parameter's owner ("0.weight" ->
// "0"), an activation site's module ("enc.relu()#2" -> "enc"); an activation
// module such as nn.ReLU is its own site.
export function moduleOf(name, kind) {
  if (name == null) return null;
  if (kind === "site") {
    const m = /^(?:(.*)\.)?[A-Za-z_][A-Za-z0-9_]*\(\)(?:#\d+)?$/.exec(name);
    return m ? m[1] || "" : name;
  }
  const dot = name.lastIndexOf(".");
  return dot >= 0 ? name.slice(0, dot) : "";
}
