"""Cost of FedSim's own steps around the app: load, split, write the sites' inputs, centralized SVD, compare, report.

Runs alone (`.venv/bin/python bench/bench_workflows.py`), writes bench/results/workflows.json. The "federated" result
fed to compare is the exact SVD written in the app's output format, so compare does its full work.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fedsim_runner import compare, data, report  # noqa: E402
from fedsim_runner.config import parse_config  # noqa: E402
from fedsim_runner.workflows import svd  # noqa: E402

CASES = [
    ("sklearn:digits", 3, {}),
    ("sklearn:digits", 16, {}),
    ("sklearn:breast_cancer", 3, {}),
    ("synthetic", 3, {"samples": 5000, "features": 500, "rank": 10}),
]


def project(source: str, n_sites: int, extra: dict) -> object:
    lines = ["[project]", 'name = "bench"', 'workflow = "svd"', "[data]", f'source = "{source}"']
    lines += [f"{k} = {v}" for k, v in extra.items()]
    lines += ["[workflow]", "k = 10"]
    for i in range(n_sites):
        lines += ["[[sites]]", f'name = "s{i}"', f'fc_user = "s{i}@bench"'] + (["coordinator = true"] if i == 0 else [])
    text = "\n".join(lines) + "\n"
    return parse_config(text, Path(tempfile.gettempdir()) / "bench_workflows.toml")


def write_exact_output(out: Path, ds, rows, central) -> None:
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(central["left"], index=ds.feature_names).to_csv(out / "left_eigenvectors.tsv", sep="\t")
    ids = [ds.sample_ids[i] for i in rows]
    pd.DataFrame(central["projections"][rows], index=ids).to_csv(out / "projections.tsv", sep="\t")
    pd.DataFrame(central["right"][rows], index=ids).to_csv(out / "right_eigenvectors.tsv", sep="\t")
    pd.DataFrame(central["eigenvalues"]).to_csv(out / "eigenvalues.tsv", sep="\t", header=False, index=False)


def read_all(folder: Path, sites) -> dict:
    return {s: svd.read_result(folder / s) for s in sites}


def timed(fn, *args, **kw):
    t0 = time.perf_counter()
    value = fn(*args, **kw)
    return value, time.perf_counter() - t0


def main() -> None:
    results = []
    for source, n_sites, extra in CASES:
        cfg = project(source, n_sites, extra)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            ds, t_load = timed(data.load_dataset, cfg)
            sp, t_split = timed(data.split, ds, cfg, [s.name for s in cfg.sites])
            files, t_prepare = timed(svd.prepare, cfg, ds, sp)
            p = svd.params(cfg)
            central, t_central = timed(svd.centralized, ds, p)
            for site, rows in sp.items():
                write_exact_output(tmp / site, ds, rows, central)
            federated, t_read = timed(read_all, tmp, sp)
            comparison, t_compare = timed(compare.evaluate, "svd", cfg, ds, sp, federated, tmp / "run")
            _, t_report = timed(report.write_report, tmp / "run", comparison, {}, cfg)
        row = {
            "dataset": ds.name, "samples": ds.n_samples, "features": ds.n_features, "sites": n_sites,
            "input_mb": round(sum(len(b) for f in files.values() for b in f.values()) / 2**20, 2),
            "load_s": t_load, "split_s": t_split, "prepare_s": t_prepare, "centralized_s": t_central,
            "read_results_s": t_read, "evaluate_s": t_compare, "report_s": t_report,
            "max_angle": comparison["max_angle"], "passed": comparison["passed"],
        }
        results.append(row)
        print(f"{row['dataset'][:40]:40} sites={n_sites:2d}  " + "  ".join(
            f"{k[:-2]}={v:.3f}s" for k, v in row.items() if k.endswith("_s")), flush=True)
    out = REPO / "bench" / "results" / "workflows.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"numpy": np.__version__, "results": results}, indent=1) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
