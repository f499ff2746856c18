"""Benchmark reports: JSON (everything) and a markdown table per case, plus a short terminal summary.

Files: <out>/<device>/<date>-<name>.json and .md, where <device> is `cpu` or the GPU's name as a
slug (dream.profile.device_slug). CPU reports say so in their title: their figures are for checking
the tooling and are never put beside GPU figures.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from bench.harness import ON_GPU, SESSION, SETTINGS, Goal
from dream.profile import (device_label, environment_info, environment_markdown, markdown_table, significant,
                           unique_stem)

# % of a ceiling compares a kernel with the GPU's copy or matmul rate; on CPU (Triton's interpreter) it means nothing
NO_CEILING = "n/a (CPU)"


def _ms(seconds) -> str:
    if seconds is None:
        return ""
    ms = seconds * 1e3
    return f"{ms:.4g}" if ms < 1000 else f"{ms:,.0f}"


def _num(value, digits=3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:,.0f}"


def _ratio(value: float) -> str:
    return f"{significant(value)}x"


def _pct(value) -> str:
    return _num(value) if ON_GPU else NO_CEILING


def case_groups(results: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(r["case"], []).append(r)
    return groups


def timed(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("status") == "ok" and r.get("time_s")]


def speedups(rows: list[dict]) -> dict[str, dict[str, float]]:
    """For each ours variant: time(anchor) / time(ours) for every timed anchor of the case."""
    done = timed(rows)
    ours = [r for r in done if r["role"] == "ours"]
    anchors = [r for r in done if r["role"] != "ours"]
    return {o["variant"]: {a["variant"]: a["time_s"] / o["time_s"] for a in anchors} for o in ours}


def evaluate_goal(goal: Goal, rows: list[dict]) -> dict:
    by_name = {r["variant"]: r for r in timed(rows)}
    candidates = (goal.ours,) if isinstance(goal.ours, str) else tuple(goal.ours)
    present = [by_name[name] for name in candidates if name in by_name]
    result = {"goal": goal.text, "ours": candidates}
    if not present:
        return {**result, "status": "n/a", "value": None, "detail": f"{' / '.join(candidates)} not timed"}
    ours = min(present, key=lambda r: r["time_s"])  # the fastest of the named ours variants
    if goal.kind == "pct_ceiling":
        value = ours.get("pct_ceiling")
        detail = f"{ours['variant']}: {_num(value)} % of the {ours.get('ceiling')} ceiling"
    elif goal.kind == "speedup":
        present = [by_name[a] for a in goal.anchors if a in by_name]
        if not present:
            return {**result, "status": "n/a", "value": None, "detail": "no anchor timed"}
        fastest = min(present, key=lambda r: r["time_s"])
        value = fastest["time_s"] / ours["time_s"]
        detail = f"{ours['variant']}: {_ratio(value)} vs {fastest['variant']}"
    else:
        raise ValueError(f"unknown goal kind {goal.kind!r}")
    status = "n/a" if value is None else ("met" if value >= goal.value else "not met")
    return {**result, "status": status, "value": value, "target": goal.value, "detail": detail}


def _telemetry_cells(r: dict) -> list[str]:
    t = r.get("telemetry") or {}
    return [_num(t.get("avg_power_w")), _num(t.get("energy_j_per_call")), _num(t.get("sm_clock_mhz"), 4)]


def memory_table(rows: list[dict]) -> str:
    header = ["variant", "checkpointing", "estimate GB (CPU, fake tensors)", "measured GB (max_memory_allocated)",
              "measured / estimate", "budget GB", "fits", "step ms", "img/s", "note"]
    table = []
    for r in rows:
        measured, estimate = r.get("measured_bytes"), r.get("estimate_bytes")
        table.append([r["variant"], r.get("policy", ""), _num(estimate / 1e9 if estimate else None, 4),
                      _num(measured / 1e9 if measured is not None else None, 4),
                      _num(measured / estimate, 3) if measured and estimate else "",
                      _num(r.get("budget_bytes", 0) / 1e9), "" if "fits" not in r else ("yes" if r["fits"] else "NO"),
                      _ms(r.get("time_s")), _num(r.get("images_per_s"), 4), r.get("note", "")])
    return markdown_table(header, table)


def case_table(rows: list[dict]) -> str:
    if any("estimate_bytes" in r for r in rows):
        return memory_table(rows)
    ratios = speedups(rows)
    primary = next(iter(ratios), None)
    bytes_based = any(r.get("gbps") is not None for r in rows)
    images = any(r.get("images_per_s") is not None for r in rows)
    graphed = any(r.get("time_plain_s") for r in rows)
    header = ["variant", "role", "dtype", "time ms" + (" (graph)" if graphed else ""), "IQR ms",
              f"{primary} speed-up" if primary else "ours speed-up",
              "GB/s" if bytes_based else "TFLOP/s", "% ceiling"]
    if images:
        header.append("img/s")
    if graphed:
        header.append("plain ms")
    header += ["peak GiB", "setup peak GiB", "avg W", "J/call", "SM MHz", "max rel err", "status"]
    table = []
    for r in rows:
        ok = r.get("status") == "ok"
        ratio = ""
        if primary and ok and r["variant"] in ratios.get(primary, {}):
            ratio = _ratio(ratios[primary][r["variant"]])
        elif primary and r["variant"] == primary:
            ratio = "1.00x (ours)"
        status = r.get("status", "")
        if status != "ok":
            status += f": {r.get('reason', '')}"
        elif r.get("smoke"):
            status = "ok (smoke: 1 call)"
        row = [r["variant"], r["role"], r["dtype"], _ms(r.get("time_s")) if ok else "",
               _ms(r.get("time_iqr_s")) if ok else "", ratio,
               _num(r.get("gbps") if bytes_based else r.get("tflops"), 4) if ok else "",
               _pct(r.get("pct_ceiling")) if ok else ""]
        if images:
            row.append(_num(r.get("images_per_s"), 4) if ok else "")
        if graphed:
            row.append(_ms(r.get("time_plain_s")) if ok else "")
        if ok and graphed and str(r.get("timing", "")).startswith("plain"):  # under a "(graph)" header
            status += f" [{r['timing'] if r['timing'] != 'plain' else 'timed as plain calls'}]"
        peak, setup_peak = r.get("peak_bytes"), r.get("setup_peak_bytes")
        row += [_num(peak / 2**30) if peak else "", _num(setup_peak / 2**30) if setup_peak else ""]
        row += _telemetry_cells(r) if ok else ["", "", ""]
        row += [_num(r.get("max_error"), 2) if ok or r.get("max_error") else "", status[:160]]
        table.append(row)
    return markdown_table(header, table)


def build_report(environment: dict) -> tuple[dict, str]:
    results = SESSION.results
    groups = case_groups(results)
    label = device_label(environment)
    goals = []
    for case_id, rows in groups.items():
        case = SESSION.cases.get(case_id)
        for goal in (case.goals if case else []):
            goals.append({"case": case_id, **evaluate_goal(goal, rows)})
    data = {"environment": environment, "ceilings": SESSION.ceilings,
            "telemetry_device": SESSION.telemetry.describe() if SESSION.telemetry else None,
            "settings": {"size": "full" if SETTINGS.full else "small", "variants": SETTINGS.variants,
                         "timed": SESSION.timing, "target_s": SETTINGS.target_s},
            "results": results, "speedups": {cid: speedups(rows) for cid, rows in groups.items()},
            "goals": goals if ON_GPU else []}
    c = SESSION.ceilings or {}
    lines = [f"# Benchmarks: {SETTINGS.name} — {label}", ""]
    if not ON_GPU:
        lines += ["**CPU figures** (small sizes, Triton kernels through the interpreter): they check the "
                  "harness, they say nothing about GPU speed, and are never compared with GPU figures.", ""]
    if not SESSION.timing:
        lines += ["**Smoke run** (`--benchmark-disable`): each time is one call, including compilation.", ""]
    lines += ["## Environment", "", environment_markdown(environment), "",
              "## Ceilings (measured at the start of this run, random data)", "",
              markdown_table(["ceiling", "value"], [
                  ["device-to-device copy (bytes read + written)", f"{_num(c.get('copy_gbps'), 4)} GB/s"],
                  [f"bf16 matmul {c.get('matmul_bf16_n')}^3", f"{_num(c.get('matmul_bf16_tflops'), 4)} TFLOP/s"],
                  [f"fp32 matmul {c.get('matmul_fp32_n')}^3 (TF32 off)",
                   f"{_num(c.get('matmul_fp32_tflops'), 4)} TFLOP/s"]]
                  + ([[f"fp32 matmul {c.get('matmul_tf32_n')}^3 with TF32 (the ceiling of fp32 variants)",
                       f"{_num(c.get('matmul_tf32_tflops'), 4)} TFLOP/s"]] if c.get("matmul_tf32_tflops") else [])),
              "",
              "How to read: time = median per call (rounds of `inner` calls, each round ended by a device "
              "sync; kernel cases on a GPU replay the calls as one CUDA graph, and 'plain ms' is the same "
              "calls launched from Python, launch overhead included); speed-up = time of that row / time "
              "of the first *ours* variant (>1: ours is faster); "
              "% ceiling = GB/s of the fewest bytes one call must move over the copy ceiling (memory-bound "
              "ops), or counted TFLOP/s over the matmul ceiling of the variant's dtype; peak = "
              "torch.cuda.max_memory_allocated over one call (inputs included); setup peak = the same from "
              "the variant's build through compilation, check, timing and graph capture (a CUDA-graph "
              "variant's memory is its graph pool, made at capture: its replays allocate nothing, so only the "
              "setup peak shows it); W, J/call and SM clock "
              "from NVML over the timed rounds; max rel err = ||out-ref||/||ref|| of the checked outputs.",
              ""]
    if goals and ON_GPU:
        lines += ["## Goals (from the issues; reported, not asserted)", "",
                  markdown_table(["case", "goal", "measured", "status"],
                                 [[g["case"], g["goal"], g.get("detail", ""), g["status"]] for g in goals]), ""]
    current_suite = None
    for case_id, rows in groups.items():
        suite = rows[0]["suite"]
        if suite != current_suite:
            lines += [f"## {suite}", ""]
            current_suite = suite
        describe = rows[0].get("describe") or ""
        lines += [f"### {case_id}" + (f" — {describe}" if describe else ""), "", case_table(rows), ""]
        info = next((r.get("info") for r in rows if r.get("info")), None)
        if info:
            lines += ["Inputs: " + ", ".join(f"{k}={v}" for k, v in info.items()), ""]
    return data, "\n".join(lines)


def write_report(out_root: str) -> tuple[Path, Path] | None:
    if not SESSION.results:
        return None
    if SESSION.stem is None:
        SESSION.use_root(out_root)
    partial = SESSION.partial_path()
    # this run's own partial file is replaced by its report; a report another run wrote meanwhile is not
    SESSION.stem = unique_stem(SESSION.stem, (".md", ".json"))
    environment = environment_info()
    data, markdown = build_report(environment)
    json_path, md_path = SESSION.report_path(".json"), SESSION.report_path(".md")
    json_path.write_text(json.dumps(data, indent=1, default=str))
    md_path.write_text(markdown + "\n")
    if partial is not None and partial.exists():
        partial.unlink()
    return json_path, md_path


def summary_lines() -> list[str]:
    """One line per case: ours, its time, and its speed-up over the fastest anchor."""
    lines = []
    for case_id, rows in case_groups(SESSION.results).items():
        done = timed(rows)
        ours = [r for r in done if r["role"] == "ours"]
        anchors = [r for r in done if r["role"] != "ours"]
        failed = [f"{r['variant']} ({r['status']})" for r in rows if r.get("status") in ("mismatch", "error")]
        text = f"{case_id:<42}"
        if any("estimate_bytes" in r for r in rows):
            parts = []
            for r in rows:
                part = f"{r.get('policy')}: est {r['estimate_bytes'] / 1e9:.2f} GB"
                if r.get("measured_bytes") is not None:
                    part += f", measured {r['measured_bytes'] / 1e9:.2f} GB{'' if r.get('fits') else ' (over)'}"
                parts.append(part)
            lines.append(text + " " + "; ".join(parts))
            continue
        if ours:
            o = min(ours, key=lambda r: r["time_s"])
            text += f" {o['variant']:<24} {_ms(o['time_s']):>9} ms"
            if not ON_GPU:
                text += f" ceil {NO_CEILING}"
            elif o.get("pct_ceiling") is not None:
                text += f" {o['pct_ceiling']:5.1f}% ceil"
            if anchors:
                a = min(anchors, key=lambda r: r["time_s"])
                text += f"  {_ratio(a['time_s'] / o['time_s'])} vs fastest anchor {a['variant']}"
        elif anchors:
            a = min(anchors, key=lambda r: r["time_s"])
            text += f" (no ours timed) fastest {a['variant']} {_ms(a['time_s'])} ms"
        if failed:
            text += f"  FAILED: {', '.join(failed)}"
        lines.append(text)
    return lines
