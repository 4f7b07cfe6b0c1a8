// Fetching and decoding the plugin's routes (tb_diag_plugin/http_api.md).
// Relative URLs resolve against the iframe's <base href="plugin/diagnostics/">,
// so they work under --path_prefix and /experiment/<id>/ too.

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function fail(r) {
  let message = `HTTP ${r.status}`;
  try {
    const body = await r.clone().json();
    if (body && typeof body.error === "string") message = body.error;
  } catch (e) {
    // not JSON (a 500 from werkzeug is HTML): keep the status line
  }
  return new ApiError(r.status, message);
}

function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v == null) continue;
    if (Array.isArray(v)) for (const item of v) q.append(k, String(item));
    else q.append(k, String(v));
  }
  return q.toString();
}

export async function getJSON(route, params = {}) {
  const qs = query(params);
  const r = await fetch(`./${route}${qs ? "?" + qs : ""}`, {credentials: "same-origin"});
  if (!r.ok) throw await fail(r);
  return r.json();
}

// One metric of one run, rows x layers (rows are steps or bins of steps).
export class Values {
  constructor(header, arrays) {
    this.run = header.run;
    this.metric = header.metric;
    this.layers = header.layers;
    this.layerTypes = header.layer_types;
    this.numSteps = header.num_steps;
    this.firstStep = header.first_step;
    this.lastStep = header.last_step;
    this.binned = header.binned;
    this.problems = header.problems || [];
    // Grouped answers (max_rows): per row, null for a layer or {label, members} for a group of layers.
    this.groups = header.groups || null;
    this.numLayers = header.num_layers ?? header.layers.length;
    this.dataVersion = header.data_version ?? null;
    this.L = this.layers.length;
    this.stepFirst = arrays.step_first;
    this.stepLast = arrays.step_last;
    this.B = this.stepFirst.length;
    this.mean = arrays.mean;
    this.min = arrays.min || arrays.mean; // rows that are single steps: min = max = mean
    this.max = arrays.max || arrays.mean;
    this.nonfinite = arrays.nonfinite;
    this.present = arrays.present;
  }

  at(i, j, name = "mean") {
    return this[name][i * this.L + j];
  }

  // Whether cell (i, j) holds a recorded value (layers can be absent at a step).
  has(i, j) {
    return this.present[i * this.L + j] > 0;
  }

  // A cell is drawn as non-finite when any value in it was NaN/Inf.
  bad(i, j) {
    return this.nonfinite[i * this.L + j] > 0 || (this.has(i, j) && !Number.isFinite(this.at(i, j)));
  }

  column(j, name = "mean") {
    const out = new Array(this.B);
    for (let i = 0; i < this.B; i++) out[i] = this.has(i, j) ? this[name][i * this.L + j] : null;
    return out;
  }

  // The group a row is ({label, members}), or null when the row is one layer.
  group(j) {
    return this.groups ? this.groups[j] : null;
  }

  layerIndex(name) {
    return this.layers.indexOf(name);
  }

  rowOfStep(step) {
    for (let i = 0; i < this.B; i++) if (step >= this.stepFirst[i] && step <= this.stepLast[i]) return i;
    return -1;
  }
}

const TYPED = {float64: Float64Array, float32: Float32Array, uint8: Uint8Array, uint16: Uint16Array};

export function decodeF32(buf) {
  const dv = new DataView(buf);
  const h = dv.getUint32(0, true);
  const header = JSON.parse(new TextDecoder("utf-8").decode(new Uint8Array(buf, 4, h)));
  const base = 4 + h;
  const arrays = {};
  for (const a of header.arrays) {
    const n = a.shape.reduce((x, y) => x * y, 1);
    const off = base + a.offset;
    const Ctor = TYPED[a.dtype];
    if (!Ctor) throw new ApiError(0, `unknown array type ${a.dtype} in the answer`);
    const bytes = n * Ctor.BYTES_PER_ELEMENT;
    // Views need aligned offsets; the server aligns, copy if it ever does not.
    arrays[a.name] = off % Ctor.BYTES_PER_ELEMENT === 0 ? new Ctor(buf, off, n) : new Ctor(buf.slice(off, off + bytes));
  }
  return new Values(header, arrays);
}

// Client-side cache; a live poll (`refresh`) drops only the entries whose data changed.
const cache = new Map();
const versionOf = new Map(); // values entry's key -> [metric, data version it was fetched at]
const runVersion = new Map(); // run -> data version of the whole run at the last poll

export function invalidate(run) {
  for (const key of [...cache.keys()]) {
    if (key.startsWith(JSON.stringify(run) + "|")) {
      cache.delete(key);
      versionOf.delete(key);
    }
  }
}

// A live-update poll of one run: asks the metrics' data versions (a few hundred bytes) and drops the
// cached answers of the metrics that changed since they were fetched, and the run's tags and findings
// when anything changed. True when something was dropped (the view must redraw); a run that has not
// changed costs this one request, and nothing is fetched again.
export async function refresh(run) {
  const body = await getJSON("versions", {run});
  const prefix = JSON.stringify(run) + "|";
  let changed = false;
  for (const [key, [metric, version]] of [...versionOf]) {
    if (key.startsWith(prefix) && body.metrics[metric] !== version) {
      cache.delete(key);
      versionOf.delete(key);
      changed = true;
    }
  }
  const before = runVersion.get(run);
  if (before !== undefined && before !== body.data_version) {
    for (const what of ["tags", "findings", "structure"]) cache.delete(prefix + what);
    for (const key of [...cache.keys()]) if (key.startsWith(prefix + "model|")) cache.delete(key);
    changed = true;
  }
  runVersion.set(run, body.data_version);
  return changed;
}

function cached(key, make) {
  if (!cache.has(key)) {
    const p = make();
    cache.set(key, p);
    p.catch(() => cache.delete(key));
    if (cache.size > 400) {
      const oldest = cache.keys().next().value;
      cache.delete(oldest);
      versionOf.delete(oldest);
    }
  }
  return cache.get(key);
}

// Problems that /values reports for a metric (steps skipped for a wrong shape),
// gathered per run for the app's warning box.
const seriesProblems = new Map();
let problemListener = null;

export function onProblems(fn) {
  problemListener = fn;
}

export function problemsOf(run) {
  return [...(seriesProblems.get(run) || [])];
}

function noteProblems(v) {
  if (!v.problems.length) return;
  const seen = seriesProblems.get(v.run) || new Set();
  const before = seen.size;
  for (const p of v.problems) seen.add(p);
  seriesProblems.set(v.run, seen);
  if (seen.size !== before && problemListener) problemListener(v.run);
}

// `maxRows` groups the layers along the module tree to at most that many rows; `expand` (group keys)
// and `reveal` (layer names) open groups beyond it (tb_diag_plugin/http_api.md).
export function values(run, metric, opts = {}) {
  const params = {run, metric, format: "f32", points: opts.points || 1000, start: opts.start, end: opts.end,
                  layer: opts.layers, max_rows: opts.maxRows,
                  expand: opts.maxRows ? opts.expand : undefined, reveal: opts.maxRows ? opts.reveal : undefined};
  const key = JSON.stringify(run) + "|values|" + query(params);
  return cached(key, async () => {
    const r = await fetch(`./values?${query(params)}`, {credentials: "same-origin"});
    if (!r.ok) throw await fail(r);
    const v = decodeF32(await r.arrayBuffer());
    noteProblems(v);
    if (v.dataVersion != null && cache.has(key)) versionOf.set(key, [metric, v.dataVersion]);
    return v;
  });
}

export function tags(run) {
  return cached(JSON.stringify(run) + "|tags", () => getJSON("tags", {run}));
}

// The model view's rows (/model): the module tree grouped to at most `maxRows` rows, `expand` (group keys)
// and `reveal` (modules or layers) opened beyond it; `waitMs` holds the request until the findings are in.
export function model(run, opts = {}) {
  const params = {run, max_rows: opts.maxRows, expand: opts.expand, reveal: opts.reveal, wait_ms: opts.waitMs};
  return cached(JSON.stringify(run) + "|model|" + query(params), async () => {
    const body = await getJSON("model", params);
    // Answers without the findings are asked again, never kept.
    if (!body.findings_complete) cache.delete(JSON.stringify(run) + "|model|" + query(params));
    return body;
  });
}

export function structure(run) {
  return cached(JSON.stringify(run) + "|structure", () => getJSON("structure", {run}));
}

// The server answers at once with what is ready (partial=true); then the tab asks again, and the server
// holds each of those requests until the findings are complete (or wait_ms has passed), so that they
// show the moment they are computed.
export function findings(run) {
  return cached(JSON.stringify(run) + "|findings", async () => {
    for (let ask = {run, partial: "true"}; ; ask = {run, partial: "true", wait_ms: "3000"}) {
      const asked = Date.now();
      const body = await getJSON("findings", ask);
      if (body.complete !== false) return body;
      // A server that did not wait (one without wait_ms, or shutting down) is not asked in a tight loop.
      if (ask.wait_ms && Date.now() - asked < 1000) await new Promise((resolve) => setTimeout(resolve, 1000));
    }
  });
}

export function runs() {
  return getJSON("runs");
}

// A derived metric (`metric`, e.g. the gradient-to-weight ratio) as the ratio
// g / w of two recorded ones, matched by layer name and step. For bins it is
// the ratio of the bin means.
export function ratio(g, w, metric) {
  const layers = g.layers.filter((n) => w.layers.includes(n));
  const gi = layers.map((n) => g.layerIndex(n));
  const wi = layers.map((n) => w.layerIndex(n));
  const wRow = new Map();
  for (let i = 0; i < w.B; i++) wRow.set(w.stepFirst[i], i);
  const L = layers.length;
  const B = g.B;
  const mean = new Float32Array(B * L).fill(NaN);
  const nonfinite = new Float32Array(B * L);
  const present = new Float32Array(B * L);
  for (let i = 0; i < B; i++) {
    const k = wRow.get(g.stepFirst[i]);
    if (k === undefined) continue;
    for (let j = 0; j < L; j++) {
      if (!g.has(i, gi[j]) || !w.has(k, wi[j])) continue;
      const v = g.at(i, gi[j]) / w.at(k, wi[j]);
      mean[i * L + j] = v;
      present[i * L + j] = 1;
      nonfinite[i * L + j] = g.bad(i, gi[j]) || w.bad(k, wi[j]) || !Number.isFinite(v) ? 1 : 0;
    }
  }
  return new Values(
    {run: g.run, metric, layers, layer_types: layers.map(() => ""), num_steps: g.numSteps,
     first_step: g.firstStep, last_step: g.lastStep, binned: g.binned, problems: g.problems,
     groups: g.groups ? layers.map((n) => g.group(g.layerIndex(n))) : null, num_layers: g.numLayers},
    {step_first: g.stepFirst, step_last: g.stepLast, mean, min: mean, max: mean, nonfinite, present},
  );
}
