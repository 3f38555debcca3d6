"""The whole `python -m fedsim_runner svd` at 1, 2, 4, 8 and 16 namespace sites (root): where a run's time goes.

Each size is one real run as a user starts it (digits, iid, k = 5, timing fast): wall time per phase (sites, hub,
distribute, cluster, accounts, controllers, project, upload, run, download, compare, down), the orchestrator's CPU,
its peak RSS and its children's, the largest angle to the centralized SVD. Run alone:
`.venv/bin/python bench/bench_workflow.py [SIZES…]` → bench/results/workflow.json and workflow.png.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
SIZES = (1, 2, 4, 8, 16)
SUBNET = "10.228.0.0/16"  # the benchmark's own range: it never meets `make demo` or the tests


def project(folder: Path, n: int) -> Path:
    path = folder / "project.toml"
    path.write_text(
        '[project]\nname = "fsbench-run"\nworkflow = "svd"\ntiming = "fast"\noutdir = "runs"\n'
        'credentials = "operator.env"\n'
        f'[provider]\nkind = "local"\nisolation = "namespace"\nsubnet = "{SUBNET}"\n'
        '[data]\nsource = "sklearn:digits"\nsplit = "iid"\n[workflow]\nk = 5\n'
        + "".join(f'[[sites]]\nname = "s{i}"\nfc_user = "s{i}@bench.local"\ncoordinator = {str(i == 0).lower()}\n'
                  for i in range(n)))
    return path


def one_run(n: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="fsbench-run-") as tmp:
        path = project(Path(tmp), n)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "fedsim_runner", "svd", "--config", str(path)], cwd=REPO,
                              capture_output=True, text=True, timeout=3600)
        wall = time.perf_counter() - t0
        runs = sorted((Path(tmp) / "runs").glob("*-svd"))
        metrics = json.loads((runs[-1] / "metrics.json").read_text()) if runs else {}
        comparison_file = runs[-1] / "comparison.json" if runs else None
        comparison = json.loads(comparison_file.read_text()) if comparison_file and comparison_file.exists() else {}
    phases = {p["name"]: {"wall": round(p["wall"], 3), "cpu": round(p["cpu"], 3),
                          "peak_rss_mb": round(p["peak_rss"] / 2**20, 1),
                          "children_peak_rss_mb": round(p.get("children_peak_rss", 0) / 2**20, 1)}
              for p in metrics.get("phases", [])}
    return {
        "sites": n,
        "exit_code": proc.returncode,
        "error": proc.stderr.strip().splitlines()[-1][:300] if proc.returncode else None,
        "wall_s": round(wall, 2),
        "phases": phases,
        "cpu_s": round(sum(p["cpu"] for p in phases.values()), 2),
        "peak_rss_mb": max((p["peak_rss_mb"] for p in phases.values()), default=None),
        "children_peak_rss_mb": max((p["children_peak_rss_mb"] for p in phases.values()), default=None),
        "max_angle": comparison.get("max_angle"),
        "passed": comparison.get("passed"),
    }


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for r in rows:
        names += [p for p in r["phases"] if p not in names]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    bottoms = [0.0] * len(rows)
    labels = [str(r["sites"]) for r in rows]
    colours = plt.get_cmap("tab20").colors
    for i, name in enumerate(names):
        values = [r["phases"].get(name, {}).get("wall", 0.0) for r in rows]
        ax.bar(labels, values, bottom=bottoms, label=name, color=colours[i % len(colours)])
        bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
    ax.set_xlabel("sites")
    ax.set_ylabel("wall time (s)")
    ax.set_title("python -m fedsim_runner svd: wall time per phase (namespace sites, digits, k = 5)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    if os.geteuid() != 0:
        sys.exit("bench_workflow: namespace sites need root")
    sizes = [int(a) for a in sys.argv[1:]] or list(SIZES)
    rows = []
    for n in sizes:
        row = one_run(n)
        rows.append(row)
        print(f"{n:>3} sites: exit {row['exit_code']}, {row['wall_s']:.1f} s, max angle {row['max_angle']}, "
              + ", ".join(f"{k} {v['wall']:.2f}" for k, v in row["phases"].items()), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    document = {"benchmark": "workflow", "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                                     "load_at_start": os.getloadavg()},
                "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs": rows}
    (RESULTS / "workflow.json").write_text(json.dumps(document, indent=2) + "\n")
    plot(rows, RESULTS / "workflow.png")
    print(f"written {RESULTS / 'workflow.json'}")


if __name__ == "__main__":
    main()
