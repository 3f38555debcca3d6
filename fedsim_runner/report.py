"""The run's report: report.md, a self-contained report.html with plots, and the summary table printed at the end.

Plots are rendered with matplotlib (Agg) to PNG and embedded as base64, so report.html opens anywhere, offline.
Only what FedSim knows without secrets goes in: site names, sample counts, numbers and timings (never FeatureCloud
user names, tokens or passwords). `write_grid_summary` turns many runs' comparison.json files into one table and plot
(the Snakemake workflow in workflow/ uses it).
"""

from __future__ import annotations

import base64
import io
import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from jinja2 import Environment, PackageLoader, select_autoescape  # noqa: E402
from rich.table import Table  # noqa: E402

PHASE_COLOURS = plt.get_cmap("tab10").colors


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits + 1}g}"
    return str(value)


# ------------------------------------------------------------------------------------------------- key numbers


def key_numbers(comparison: dict) -> list[tuple[str, str]]:
    """The few numbers that say whether the federated run reproduced the centralized one."""
    c = comparison
    if c.get("workflow") == "mean":
        return [
            ("federated mean (app)", _fmt(c["federated"], 6)),
            ("mean of local means (central)", _fmt(c["mean_of_local_means"], 6)),
            ("pooled mean (central)", _fmt(c["pooled_mean"], 6)),
            ("abs error vs mean of local means", _fmt(c["abs_error"])),
            ("tolerance", _fmt(c["tolerance"])),
        ]
    rows = [
        ("components (k)", _fmt(c.get("k"))),
        ("largest component angle (rad)", _fmt(c.get("max_angle"))),
        ("subspace angle (rad)", _fmt(c.get("subspace_angle"))),
        ("tolerance (rad)", _fmt(c.get("tolerance"))),
        ("max eigenvalue relative error", _fmt((c.get("eigenvalues") or {}).get("max_relative_error"))),
        ("left vectors, max difference between sites", _fmt(c.get("left_consistency"))),
    ]
    proj = [s["projections"]["max_abs_diff"] for s in c.get("sites", {}).values() if "projections" in s]
    if proj:
        rows.append(("projections, max abs difference (all sites)", _fmt(max(proj))))
    ref = c.get("reference")
    if ref:
        rows.append(("single-site reference vs centralized, max angle",
                     _fmt(max(ref["angles_reference_vs_centralized"], default=None))))
    return rows


def summary_table(comparison: dict) -> Table:
    """The short table printed at the end of a run."""
    passed = comparison.get("passed")
    verdict = "[green]PASSED[/green]" if passed else "[red]FAILED[/red]"
    table = Table(title=f"{comparison.get('workflow', '?')}: federated vs centralized — {verdict}", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in key_numbers(comparison):
        table.add_row(name, value)
    ds = comparison.get("dataset")
    if ds:
        table.add_row("data", f"{ds['name']} ({ds['samples']}×{ds['features']}, split {ds['split']})")
    return table


def _site_rows(comparison: dict) -> tuple[list[str], list[list[str]]]:
    sites = comparison.get("sites", {})
    if comparison.get("workflow") == "mean":
        header = ["site", "samples", "local mean", "federated value"]
        rows = [[s, _fmt(v.get("samples")), _fmt(v.get("local_mean"), 6), _fmt(v.get("federated"), 6)]
                for s, v in sites.items()]
        return header, rows
    header = ["site", "samples", "iterations", "app runtime (s)", "projections max |Δ|", "projections min corr",
              "right vectors max |Δ|"]
    rows = []
    for s, v in sites.items():
        proj, right = v.get("projections") or {}, v.get("right") or {}
        corr = [x for x in proj.get("correlation_per_component", []) if x is not None]
        rows.append([s, _fmt(v.get("samples")), _fmt(v.get("iterations")), _fmt(v.get("runtime")),
                     _fmt(proj.get("max_abs_diff")), _fmt(min(corr) if corr else None, 6),
                     _fmt(right.get("max_abs_diff"))])
    return header, rows


# ----------------------------------------------------------------------------------------------------- metrics


def _seconds(value: Any) -> float | None:
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value).timestamp()
        except ValueError:
            return None
    return None


def _spans(entries: Any) -> list[tuple[str, float | None, float | None, dict]]:
    """(name, start, duration, extra) from a list of {name, start, end|wall|seconds} or a {name: {...}|seconds} map."""
    if isinstance(entries, dict):
        entries = [{"name": k, **(v if isinstance(v, dict) else {"wall": v})} for k, v in entries.items()]
    spans = []
    for e in entries or []:
        if not isinstance(e, dict):
            continue
        name = str(e.get("name") or e.get("phase") or e.get("step") or "?")
        start = _seconds(e.get("start", e.get("started")))
        end = _seconds(e.get("end", e.get("finished")))
        wall = e.get("wall", e.get("seconds", e.get("duration")))
        duration = float(wall) if isinstance(wall, int | float) else (end - start if None not in (start, end) else None)
        spans.append((name, start, duration, e))
    return spans


def phase_rows(metrics: dict) -> list[list[str]]:
    rows = []
    for name, _, duration, extra in _spans(metrics.get("phases")):
        rss = extra.get("peak_rss_mb", extra.get("peak_rss"))
        if isinstance(rss, int | float) and rss > 1e5:  # bytes
            rss = rss / 2**20
        rows.append([name, _fmt(duration), _fmt(extra.get("cpu", extra.get("cpu_seconds"))), _fmt(rss),
                     str(extra.get("status", "failed" if extra.get("error") else "ok"))])
    return rows


def timeline(metrics: dict) -> dict[str, list[tuple[str, float, float]]]:
    """{lane: [(step, start, duration)]}, times relative to the first start: the orchestrator's phases, then each site.

    Entries without a start are laid end to end.
    """
    lanes: dict[str, list[tuple[str, float | None, float | None]]] = {}
    phases = _spans(metrics.get("phases"))
    if phases:
        lanes["orchestrator"] = [(n, s, d) for n, s, d, _ in phases]
    for site, steps in (metrics.get("sites") or {}).items():
        if isinstance(steps, dict) and "steps" in steps:
            steps = steps["steps"]
        lanes[str(site)] = [(n, s, d) for n, s, d, _ in _spans(steps)]
    starts = [s for lane in lanes.values() for _, s, _ in lane if s is not None]
    origin = min(starts) if starts else 0.0
    out: dict[str, list[tuple[str, float, float]]] = {}
    for lane, items in lanes.items():
        cursor = 0.0
        placed = []
        for name, start, duration in items:
            begin = start - origin if start is not None else cursor
            length = max(duration or 0.0, 0.0)
            placed.append((name, begin, length))
            cursor = begin + length
        if placed:
            out[lane] = placed
    return out


# -------------------------------------------------------------------------------------------------------- plots


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def angle_plot(comparison: dict) -> str | None:
    angles = comparison.get("angles")
    if not angles:
        return None
    tol = comparison.get("tolerance", 1e-6)
    floor = 1e-17  # an exact match has angle 0, which a log axis cannot show: draw it at the floor
    values = [max(a if a is not None else math.nan, floor) for a in angles]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    colours = ["#2e7d32" if v < tol else "#c62828" for v in values]
    ax.bar(range(1, len(values) + 1), values, color=colours)
    ax.axhline(tol, color="#555", linestyle="--", linewidth=1, label=f"tolerance {tol:g} rad")
    sub = comparison.get("subspace_angle")
    if sub is not None:
        ax.axhline(max(sub, floor), color="#1565c0", linestyle=":", linewidth=1.2, label=f"subspace angle {sub:.2e}")
    ax.set_yscale("log")
    ax.set_ylim(floor / 2, max(max(values), tol) * 20)
    ax.set_xlabel("component")
    ax.set_ylabel("angle to centralized (rad)")
    ax.set_xticks(range(1, len(values) + 1))
    ax.set_title("Left singular vectors: federated vs centralized")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return _png(fig)


def scatter_plot(comparison: dict) -> str | None:
    scatter = comparison.get("scatter") or {}
    if not scatter:
        return None
    sites = sorted(scatter)
    cols = min(len(sites), 4)
    rows = math.ceil(len(sites) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(sites):]:
        ax.axis("off")
    for ax, site in zip(axes.flat, sites, strict=False):
        fed, cen = scatter[site]["federated"], scatter[site]["centralized"]
        for comp in range(len(fed[0]) if fed else 0):
            x = [row[comp] for row in cen]
            y = [row[comp] for row in fed]
            ax.scatter(x, y, s=6, alpha=0.6, color=PHASE_COLOURS[comp], label=f"PC{comp + 1}")
        lo = min([min(r) for r in cen + fed], default=0)
        hi = max([max(r) for r in cen + fed], default=1)
        ax.plot([lo, hi], [lo, hi], color="#555", linewidth=0.8)
        ax.set_title(f"{site} ({len(fed)} samples)", fontsize=9)
        ax.set_xlabel("centralized projection", fontsize=8)
        ax.set_ylabel("federated projection", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("Sample projections per site (on the diagonal = identical)", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def timeline_plot(metrics: dict) -> str | None:
    lanes = timeline(metrics)
    if not lanes:
        return None
    names = sorted({step for items in lanes.values() for step, _, _ in items}, key=lambda n: _first_start(lanes, n))
    colour = {n: PHASE_COLOURS[i % len(PHASE_COLOURS)] for i, n in enumerate(names)}
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(lanes) + 1.4))
    labels = list(lanes)
    for row, lane in enumerate(labels):
        for step, start, length in lanes[lane]:
            ax.broken_barh([(start, max(length, 1e-3))], (row - 0.35, 0.7), facecolors=colour[step],
                           edgecolor="white", linewidth=0.5)
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("seconds since start")
    ax.grid(axis="x", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colour[n]) for n in names]
    ax.legend(handles, names, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_title("Timeline: orchestrator phases and each site's steps")
    return _png(fig)


def _first_start(lanes: dict, name: str) -> float:
    return min((s for items in lanes.values() for n, s, _ in items if n == name), default=math.inf)


# ------------------------------------------------------------------------------------------------------ writing


def _context(run_dir: Path, comparison: dict, metrics: dict, cfg) -> dict[str, Any]:
    site_header, site_rows = _site_rows(comparison)
    project = getattr(cfg, "project", None)
    provider = getattr(cfg, "provider", None)
    setup = [
        ("run", Path(run_dir).name),
        ("workflow", comparison.get("workflow", getattr(project, "workflow", "?"))),
        ("platform", getattr(project, "platform", "?")),
        ("timing", getattr(project, "timing", "?")),
        ("sites", ", ".join(s.name for s in getattr(cfg, "sites", []))),
        # the isolation the sites really had (auto resolves at run time), else what the file asked for
        ("provider", f"{getattr(provider, 'kind', '?')} "
                     f"({(metrics or {}).get('isolation') or getattr(provider, 'isolation', '-')})"),
        ("seed", getattr(project, "seed", "?")),
    ]
    ds = comparison.get("dataset")
    if ds:
        setup.insert(2, ("data", f"{ds['name']}: {ds['samples']} samples × {ds['features']} features, split "
                                  f"{ds['split']}" + (f", {ds['dropped_constant_features']} constant features dropped"
                                                      if ds.get("dropped_constant_features") else "")))
    total = metrics.get("total_seconds", metrics.get("wall"))
    if total is None:
        total = sum(d or 0 for _, _, d, _ in _spans(metrics.get("phases")))
    return {
        "title": f"FedSim {comparison.get('workflow', '')} — {getattr(project, 'name', '')}",
        "generated": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "passed": bool(comparison.get("passed")),
        "key_numbers": key_numbers(comparison),
        "setup": setup,
        "site_header": site_header,
        "site_rows": site_rows,
        "phase_rows": phase_rows(metrics),
        "total_seconds": _fmt(float(total)) if total else None,
        "angle_png": angle_plot(comparison),
        "scatter_png": scatter_plot(comparison),
        "timeline_png": timeline_plot(metrics),
    }


def _markdown(ctx: dict) -> str:
    def table(header: list[str], rows: list[list[str]]) -> list[str]:
        return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                *("| " + " | ".join(str(c) for c in r) + " |" for r in rows), ""]

    lines = [f"# {ctx['title']}", "", f"**{'PASSED' if ctx['passed'] else 'FAILED'}** — generated {ctx['generated']}",
             "", "## Setup", "", *table(["", ""], [list(r) for r in ctx["setup"]]),
             "## Federated vs centralized", "", *table(["metric", "value"], [list(r) for r in ctx["key_numbers"]])]
    if ctx["site_rows"]:
        lines += ["## Sites", "", *table(ctx["site_header"], ctx["site_rows"])]
    if ctx["phase_rows"]:
        lines += ["## Phases", "", *table(["phase", "wall (s)", "CPU (s)", "peak RSS (MB)", "status"],
                                          ctx["phase_rows"])]
    lines += ["Plots: see report.html.", ""]
    return "\n".join(lines)


def write_report(run_dir: Path, comparison: dict, metrics: dict | None, cfg) -> tuple[Path, Path]:
    """report.md and report.html in the run directory; returns their paths."""
    run_dir = Path(run_dir)
    ctx = _context(run_dir, comparison, metrics or {}, cfg)
    env = Environment(loader=PackageLoader("fedsim_runner", "templates"), autoescape=select_autoescape(["j2"]))
    html = env.get_template("report.html.j2").render(**ctx)
    md_path, html_path = run_dir / "report.md", run_dir / "report.html"
    md_path.write_text(_markdown(ctx))
    html_path.write_text(html)
    return md_path, html_path


# ------------------------------------------------------------------------------------------- grids of runs


def grid_row(path: Path) -> dict[str, Any]:
    """One row of a grid summary from a comparison.json (the run's settings come from the comparison itself)."""
    c = json.loads(Path(path).read_text())
    ds = c.get("dataset", {})
    row = {
        "workflow": c.get("workflow"),
        "dataset": ds.get("name"),
        "split": ds.get("split"),
        "sites": len(ds.get("site_samples", {})) or len(c.get("sites", {})),
        "samples": ds.get("samples"),
        "passed": c.get("passed"),
    }
    if c.get("workflow") == "mean":
        row["error"] = c.get("abs_error")
    else:
        row["error"] = c.get("max_angle")
        row["subspace_angle"] = c.get("subspace_angle")
        row["eigenvalue_rel_error"] = (c.get("eigenvalues") or {}).get("max_relative_error")
    row["path"] = str(path)
    return row


def write_grid_summary(comparison_files: list[Path], out_tsv: Path, out_png: Path) -> list[dict]:
    """A table of every run (error = largest angle for svd, absolute error for mean) and a plot of error vs sites."""
    rows = sorted((grid_row(p) for p in comparison_files),
                  key=lambda r: (r["workflow"] or "", r["dataset"] or "", r["split"] or "", r["sites"]))
    columns = ["workflow", "dataset", "split", "sites", "samples", "passed", "error", "subspace_angle",
               "eigenvalue_rel_error", "path"]
    lines = ["\t".join(columns)] + ["\t".join(_fmt(r.get(c)) if c != "path" else r[c] for c in columns) for r in rows]
    Path(out_tsv).write_text("\n".join(lines) + "\n")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["workflow"], r["dataset"], r["split"]), []).append(r)
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (key, items) in enumerate(sorted(groups.items(), key=lambda kv: str(kv[0]))):
        ax.plot([r["sites"] for r in items], [max(r["error"] or 0, 1e-17) for r in items], marker="o",
                color=PHASE_COLOURS[i % len(PHASE_COLOURS)], label=" / ".join(str(k) for k in key))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("number of sites")
    ax.set_ylabel("error (svd: largest angle, rad; mean: abs)")
    ax.set_title("Federated vs centralized across the grid")
    ax.grid(alpha=0.3)
    if groups:
        ax.legend(fontsize=7)
    fig.savefig(out_png, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return rows
