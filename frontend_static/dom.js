// DOM helpers. Text from data (run, layer, component names) only ever goes
// through textContent / text nodes here, never innerHTML.

export function el(tag, props = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v == null || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = String(v);
    else if (k === "dataset") Object.assign(e.dataset, v);
    else if (k === "style") Object.assign(e.style, v);
    else if (k.startsWith("on") && typeof v === "function") e.addEventListener(k.slice(2), v);
    else if (k === "checked" || k === "value" || k === "disabled" || k === "selected") e[k] = v;
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c == null || c === false) continue;
    e.append(c instanceof Node ? c : String(c)); // strings become text nodes
  }
  return e;
}

export function clear(node) {
  while (node.firstChild) node.removeChild(node.firstChild);
  return node;
}

// A compact, readable number: 0.0123, 1.23e-7, 45.6k is avoided (exact-ish).
export function fmt(v, digits = 4) {
  if (v == null) return "–";
  if (Number.isNaN(v)) return "NaN";
  if (v === Infinity) return "+Inf";
  if (v === -Infinity) return "−Inf";
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a < 1e-3 || a >= 1e5) return v.toExponential(Math.max(0, digits - 2)).replace("e+", "e");
  return String(Number(v.toPrecision(digits)));
}

export function fmtCount(n) {
  if (n >= 1e9) return (n / 1e9).toFixed(2) + "G";
  if (n >= 1e6) return (n / 1e6).toFixed(2) + "M";
  if (n >= 1e4) return (n / 1e3).toFixed(1) + "k";
  return String(n);
}

export function fmtPct(v) {
  if (v == null || !Number.isFinite(v)) return "–";
  return (100 * v).toFixed(v < 0.01 && v > 0 ? 2 : 1) + " %";
}

export function message(text, kind = "info") {
  return el("div", {class: `msg msg-${kind}`, role: kind === "error" ? "alert" : "status"}, text);
}
