"""Costs of the Dask layer with 1, 4, 8 and 16 process sites (the real provider): scheduler + workers ready, one round of pinned tasks,
a value relayed site → orchestrator → every site, dead-site detection, stop.

Run alone: `.venv/bin/python bench/bench_cluster.py` → bench/results/cluster.json.
"""

from __future__ import annotations

import json
import operator
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fedsim_runner.cluster import Cluster  # noqa: E402
from fedsim_runner.errors import RunFailed  # noqa: E402
from fedsim_runner.site_tasks import site_identity  # noqa: E402
from tests.process_sites import process_sites  # noqa: E402

SIZES = (1, 4, 8, 16)
ROUNDS = 10


def measure(n: int, root: Path) -> dict:
    names = [f"s{i}" for i in range(n)]
    values = {"FC_USERNAME": "u", "FC_PASSWORD": "x", "FC_BASE_URL": "http://127.0.0.1:9",
              "FC_CONTROLLER_URL": "http://127.0.0.1:9"}
    with process_sites(root, {s: values for s in names}) as (provider, handles):
        return measure_on(names, provider, list(handles.values()), root)


def measure_on(names: list[str], provider, handles: list, root: Path) -> dict:
    result: dict = {"sites": len(names)}
    t = time.perf_counter()
    cluster = Cluster(None, handles, provider, log_dir=root / "dask")
    cluster.start()
    try:
        result["ready_s"] = time.perf_counter() - t
        rounds, relays = [], []
        for _ in range(ROUNDS):
            t = time.perf_counter()
            cluster.run_on_all(site_identity, {s: () for s in names})
            rounds.append(time.perf_counter() - t)
            t = time.perf_counter()
            value = cluster.run_on(names[0], operator.add, 1, 2)
            cluster.run_on_all(operator.add, {s: (value, 1) for s in names})
            relays.append(time.perf_counter() - t)
        result["pinned_round_median_s"] = statistics.median(rounds)
        result["relay_round_median_s"] = statistics.median(relays)
        victim = cluster.run_on(names[-1], site_identity)["pid"]
        killed_at: list[float] = []

        def kill() -> None:
            while not any(cluster.client.processing().values()):
                time.sleep(0.005)
            killed_at.append(time.perf_counter())
            os.kill(victim, 9)

        threading.Thread(target=kill, daemon=True).start()
        try:
            cluster.run_on(names[-1], time.sleep, 60, timeout=60)
        except RunFailed:
            result["dead_site_detected_s"] = time.perf_counter() - killed_at[0]
    finally:
        t = time.perf_counter()
        cluster.stop()
        result["stop_s"] = time.perf_counter() - t
    return result


def main() -> None:
    results = []
    for n in SIZES:
        with tempfile.TemporaryDirectory(prefix="fedsim-bench-cluster-") as tmp:
            results.append(measure(n, Path(tmp)))
        print(json.dumps(results[-1]))
    out = REPO / "bench" / "results" / "cluster.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpus": os.cpu_count(), "runs": results}, indent=2) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
