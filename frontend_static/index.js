// Entry point of the Diagnostics tab. TensorBoard loads this module inside
// data/plugin_entry.html?name=diagnostics, whose <base href> makes relative
// URLs reach /data/plugin/diagnostics/. plotly.js is a UMD bundle served by
// the plugin (no CDN: TensorBoard's CSP allows same-origin scripts only).

function loadScript(src) {
  return new Promise((resolve, reject) => {
    const s = document.createElement("script");
    s.src = src;
    s.onload = resolve;
    s.onerror = () => reject(new Error(`could not load ${src}`));
    document.head.appendChild(s);
  });
}

function loadStyle(href) {
  const link = document.createElement("link");
  link.rel = "stylesheet";
  link.href = href;
  document.head.appendChild(link);
}

export function render() {
  return boot();
}

async function boot() {
  loadStyle("./static/style.css");
  const wait = document.createElement("div");
  wait.className = "boot";
  wait.textContent = "Loading Diagnostics…";
  document.body.appendChild(wait);
  try {
    const [, app] = await Promise.all([window.Plotly ? null : loadScript("./plotly.js"), import("./static/app.js")]);
    wait.remove();
    app.start(document.body);
  } catch (e) {
    wait.textContent = `The Diagnostics tab could not start: ${e && e.message ? e.message : e}`;
    wait.className = "boot boot-error";
    throw e;
  }
}
