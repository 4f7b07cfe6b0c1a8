"""Markdown tables and target checks from the JSON that overhead.py and reading.py write."""

from __future__ import annotations

from typing import Any, Optional

# Issue 6 targets.
TARGET_DEFAULT = 1.02
TARGET_EVERY1 = 1.15
TARGET_NONLOGGED = 1.005
TARGET_HIST_FACTOR = 3.0
TARGET_BYTES_SHARE = 0.5
TARGET_VIEW_MS = 300.0


def _r(s: Optional[dict], fmt: str = "{:.3f}") -> str:
    if not s or s.get("median") is None:
        return "–"
    return f"{fmt.format(s['median'])} [{fmt.format(s['min'])}–{fmt.format(s['max'])}]"


def _f(x: Optional[float], fmt: str = "{:.3f}") -> str:
    return "–" if x is None else fmt.format(x)


def overhead_tables(res: dict) -> str:
    lines: list[str] = []
    for name, m in res["models"].items():
        b = m["bare_step_ms"]
        lines += [
            f"#### {name}: {m['describe']}",
            "",
            f"{m['tensors']} parameter tensors, {m['parameters'] / 1e6:.2f}M parameters; bare step "
            f"{_r(b, '{:.1f}')} ms; {len(m.get('rounds_used', []))} of {m['rounds']} rounds used "
            f"(the others were disturbed: a bare median over {1.25:.2f}x the fastest round's), blocks of "
            f"{m['block_steps']['cadence']} steps (every=1 arms: {m['block_steps']['every1']}).",
            "",
            "| arm | ratio (block means) | ratio from medians | logged step: extra ms | logged step: share of bare "
            "| non-logged step ratio |",
            "|---|---|---|---|---|---|",
        ]
        for a in m["arms"].values():
            share = a["logged_step_share"]
            pct = _f(share * 100 if share is not None else None, "{:.0f} %")
            lines.append(
                f"| {a['label']} | {_r(a['ratio'])} | {_f(a['ratio_from_medians'])} "
                f"| {_r(a['logged_step_extra_ms'], '{:.1f}')} | {pct} "
                f"| {_r(a['nonlogged_ratio'])} |"
            )
        paired = [(a["label"], floor, a[f"vs_{floor}"]) for a in m["arms"].values()
                  for floor in ("floor1", "floor1_adam") if f"vs_{floor}" in a]
        if paired:
            lines += ["", "| every=1 arm against a floor arm, per round (block means) | floor | median | "
                      "quartiles | min-max |", "|---|---|---|---|---|"]
            for label, floor, v in paired:
                quart = f"{v['q1']:.3f}-{v['q3']:.3f}" if "q1" in v else "–"
                lines.append(f"| {label} | {floor} | {_f(v['median'])} | {quart} | {_f(v['min'])}-{_f(v['max'])} |")
        lines.append("")
    lines += [
        "#### Event-file bytes per logged step",
        "",
        "| model | values per logged step | Diagnostics (one event, vectors) | per-layer `add_scalar` of the same "
        "values | share | `add_scalar` of grad norms only (the arm) | `add_histogram` of grads (the arm) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in res["models"].items():
        by = m.get("bytes", {})
        d = by.get("diag_bytes_per_logged_step")
        s = by.get("add_scalar_same_numbers_bytes")
        lines.append(
            f"| {name} | {_f(by.get('values_per_logged_step'), '{:.0f}')} | {_f(d, '{:,.0f} B')} "
            f"| {_f(s, '{:,.0f} B')} | {_f(d / s if d and s else None, '{:.2f}')} "
            f"| {_f(by.get('add_scalar_bytes_per_logged_step'), '{:,.0f} B')} "
            f"| {_f(by.get('add_histogram_bytes_per_logged_step'), '{:,.0f} B')} |"
        )
    lines.append("")
    return "\n".join(lines)


def _verdict(measured: Optional[float], target: float, noise: Optional[float]) -> str:
    """yes / **no**, or "not resolved" where the A/A noise floor is wider than the margin."""
    if measured is None:
        return "–"
    n = abs(noise - 1.0) if noise is not None else 0.0
    if measured + n <= target:
        return "yes"
    if measured - n > target:
        return "**no**"
    return f"not resolved (A/A off by {n:.3f})"


def overhead_targets(res: dict) -> list[tuple[str, str, str, str]]:
    """(target, model, verdict, evidence) rows."""
    rows = []
    for name, m in res["models"].items():
        a = m["arms"]
        aa = a.get("bare2", {})
        aa_ratio = (aa.get("ratio") or {}).get("median")
        aa_nl = (aa.get("nonlogged_ratio") or {}).get("median")
        d = a.get("diag")
        if d:
            r = d["ratio"]["median"]
            rows.append((f"default cadence (every={d['every']}), all metrics: ratio <= {TARGET_DEFAULT}", name,
                         _verdict(r, TARGET_DEFAULT, aa_ratio),
                         f"{_r(d['ratio'])} (from medians {_f(d['ratio_from_medians'])}); A/A {_r(aa.get('ratio'))}"))
            n = d["nonlogged_ratio"]["median"]
            rows.append((f"step that is not logged: ratio <= {TARGET_NONLOGGED}", name,
                         _verdict(n, TARGET_NONLOGGED, aa_nl),
                         f"{_r(d['nonlogged_ratio'])}; A/A bare vs bare {_r(aa.get('nonlogged_ratio'))}"))
        d1 = a.get("diag1")
        if d1:
            r = d1["ratio"]["median"]
            rows.append((f"every=1, all metrics: ratio <= {TARGET_EVERY1}", name,
                         _verdict(r, TARGET_EVERY1, aa_ratio), f"{_r(d1['ratio'])}; A/A {_r(aa.get('ratio'))}"))
        h = a.get("add_histogram")
        if d and h:
            dl = d["logged_step_extra_ms"]["median"]
            hl = h["logged_step_extra_ms"]["median"]
            ok = dl is not None and hl is not None and (dl <= 0 or hl / dl >= TARGET_HIST_FACTOR)
            rows.append((f"added time per logged step >= {TARGET_HIST_FACTOR:.0f}x less than add_histogram", name,
                         "yes" if ok else "**no**",
                         f"{_f(dl, '{:.1f}')} ms vs {_f(hl, '{:.1f}')} ms"
                         + (f" ({hl / dl:.1f}x)" if dl and dl > 0 and hl else "")))
        by = m.get("bytes", {})
        db, sb = by.get("diag_bytes_per_logged_step"), by.get("add_scalar_same_numbers_bytes")
        if db and sb:
            rows.append((f"event bytes per logged step <= {TARGET_BYTES_SHARE:.0%} of per-layer add_scalar", name,
                         "yes" if db / sb <= TARGET_BYTES_SHARE else "**no**",
                         f"{db:,.0f} B vs {sb:,.0f} B ({db / sb:.2f})"))
    return rows


def targets_table(rows: list[tuple[str, str, Any, str]]) -> str:
    lines = ["| target | model / run | met? | measured |", "|---|---|---|---|"]
    for target, where, ok, ev in rows:
        verdict = ok if isinstance(ok, str) else ("yes" if ok else "**no**")
        lines.append(f"| {target} | {where} | {verdict} | {ev} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ reading
def _ms(s: Any) -> str:
    if s is None:
        return "–"
    if isinstance(s, dict):
        return _r(s, "{:.0f}")
    return f"{s:.0f}"


def reading_tables(res: dict) -> str:
    lines: list[str] = []
    lines += [
        "#### Loading: time until TensorBoard has every step of the run, and memory",
        "",
        "| run (logged steps x layers) | backend | Diagnostics: event file | loaded in | then preloaded by the "
        "plugin in (its CPU) | RSS | RSS without preload | "
        "per-layer scalars (`grad_norm` only): event file | loaded in | RSS |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in res["configs"]:
        d, s = c.get("diag") or {}, c.get("scalars") or {}
        pre = "–" if d.get("preload_s") is None else f"{d['preload_s']:.1f} s ({d.get('preload_cpu_s', 0):.1f} s)"
        lines.append(
            f"| {c['steps']:,} x {c['layers']} | {c['backend']} | {_mb(d.get('file_bytes'))} | {_sec(d)} "
            f"| {pre} | {_rss(d)} | {_rss(c.get('diag_no_preload') or {})} "
            f"| {_mb(s.get('file_bytes'))} | {_sec(s)} | {_rss(s)} |"
        )
    lines += [
        "",
        "#### Each view's data once loaded",
        "",
        "Milliseconds from sending a view's requests (all at once, as the tab's `Promise.all` does) to the "
        "last byte. *First*: the first visit after loading; by default the plugin has then preloaded the run "
        "(read every metric and the findings once TensorBoard had loaded it); *no preload* rows are the tab "
        "opened before that (or `--diagnostics_preload false`), when the first visit reads each metric from "
        "the data provider. *Warm*: the same view again at once. *Again*: later visits after the other views.",
        "",
        "| run | backend | view | requests | bytes on the wire | first | warm | again |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c, d, label in _diag_arms(res):
        for v in d.get("views", []):
            bad = [s for s in v.get("status", []) if s != 200]
            name = v["view"] + (f" (HTTP {bad})" if bad else "")
            lines.append(
                f"| {c['steps']:,} x {c['layers']} | {c['backend']}{label} | {name}"
                f" | {v['requests']} | {_kb(v.get('bytes'))} | {_ms(v.get('first_ms'))} | {_ms(v.get('warm_ms'))} "
                f"| {_ms(v.get('again_ms'))} |"
            )
    lines += [
        "",
        "#### The same data from TensorBoard's scalars plugin (per-layer `grad_norm/<layer>` tags)",
        "",
        "The scalars route answers one tag per request, so the heatmap's data is one request per layer: "
        "`GET /data/plugin/scalars/scalars?run=run&tag=grad_norm/<layer>` (TensorBoard keeps 1,000 samples "
        "per scalar tag by default, reservoir-sampled: spikes can be dropped), 6 at a time (a browser's "
        "connection limit) and one by one (for 500 layers, 50 tags timed one by one and the total estimated as "
        "their median x 500), against the plugin's one `/values` request for all layers.",
        "",
        "| run | backend | scalars: one tag (median ms) | scalars: all layers, sequential | scalars: all layers, "
        "6 in parallel | scalars: bytes | Diagnostics heatmap (f32), first / warm | bytes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in res["configs"]:
        s, d = c.get("scalars") or {}, c.get("diag") or {}
        hv = next((v for v in d.get("views", []) if v["view"] == "gradient flow: grad_norm heatmap"), None)
        lines.append(
            f"| {c['steps']:,} x {c['layers']} | {c['backend']} | {_ms(s.get('one_tag_ms'))} "
            f"| {_ms(s.get('all_sequential_ms'))}{' (est.)' if s.get('sequential_estimated') else ''} "
            f"| {_ms(s.get('all_parallel_ms'))} | {_kb(s.get('bytes'))} "
            f"| {_ms(hv.get('first_ms')) if hv else '–'} / {_ms(hv.get('warm_ms')) if hv else '–'} "
            f"| {_kb(hv.get('bytes')) if hv else '–'} |"
        )
    lines.append("")
    return "\n".join(lines)


def _diag_arms(res: dict):
    """(config, Diagnostics measurement, label) for each config, with preload and, where measured, without."""
    for c in res["configs"]:
        yield c, c.get("diag") or {}, ""
        if c.get("diag_no_preload"):
            yield c, c["diag_no_preload"], ", no preload"


def reading_targets(res: dict) -> list[tuple[str, str, bool, str]]:
    rows = []
    for c, d, label in _diag_arms(res):
        if c["steps"] < 20_000 or c["layers"] < 500:
            continue
        for v in d.get("views", []):
            if v["view"].startswith("(reference)"):
                continue
            first = v.get("first_ms")
            warm = (v.get("warm_ms") or {}).get("median")
            ok = first is not None and first < TARGET_VIEW_MS and (warm is None or warm < TARGET_VIEW_MS)
            rows.append((f"view data < {TARGET_VIEW_MS:.0f} ms once loaded (20k x 500)",
                         f"{c['backend']}{label}: {v['view']}", ok,
                         f"first {_ms(first)} ms, warm {_ms(v.get('warm_ms'))} ms"))
    return rows


def _mb(b: Optional[float]) -> str:
    return "–" if not b else f"{b / 1e6:,.1f} MB"


def _kb(b: Optional[float]) -> str:
    return "–" if b is None else f"{b / 1e3:,.1f} kB"


def _sec(d: dict) -> str:
    if not d:
        return "–"
    if d.get("skipped"):
        return d["skipped"]
    t = d.get("load_s")
    return "–" if t is None else f"{t:.1f} s"


def _rss(d: dict) -> str:
    r = d.get("rss_mb") if d else None
    return "–" if r is None else f"{r:,.0f} MB"
