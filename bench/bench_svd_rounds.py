"""Benchmark: federated SVD (iterative path) on N app instances through the runtime and the in-process relay, fast timing.

No hub and no controllers: one real engine process per site (fedsim_runner.localfc.runtime), each driven by the app
protocol (project_runner.drive) in its own thread over testbed.LocalRelay. This isolates the app + protocol cost from
the hub's (bench_localfc.py measures the same data through the hub). Per N in 3, 10, 30: start-up time, rounds (the
app's iterations), rounds per second (from the gaps between the coordinator's broadcasts), relay latency per round (from
the last participant's share of a round reaching the relay to the coordinator's next broadcast: the coordinator's
aggregation plus the protocol's polling), and bytes each site sent per round. Writes bench/results/svd_rounds.json.
Bounded: every run has a 300 s limit.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fedsim_runner.data import Dataset  # noqa: E402
from fedsim_runner.localfc.project_runner import AppFailed, drive  # noqa: E402
from fedsim_runner.localfc.runtime import start_instance  # noqa: E402
from fedsim_runner.localfc.testbed import LocalRelay  # noqa: E402
from fedsim_runner.localfc.timing import Timing  # noqa: E402
from fedsim_runner.workflows import svd  # noqa: E402

SITES = [int(a) for a in sys.argv[1:]] or [3, 10, 30]
K, FEATURES, SAMPLES_PER_SITE, NOISE = 5, 200, 20, 8.0  # the same data as bench_localfc.py
LIMIT = 300.0
FAST = Timing.named("fast")
RESULTS = REPO / "bench" / "results" / "svd_rounds.json"


def run_once(n_sites: int, root: Path) -> dict:
    rng = np.random.default_rng(n_sites)
    n = SAMPLES_PER_SITE * n_sites
    X = (rng.standard_normal((n, K)) * [5.0, 4.5, 4.0, 3.5, 3.0]) @ rng.standard_normal((K, FEATURES))
    X += NOISE * rng.standard_normal(X.shape)
    data = Dataset("bench", X, [f"s{i}" for i in range(n)], [f"f{j}" for j in range(FEATURES)])
    config = yaml.safe_dump(svd.app_config({**svd.DEFAULTS, "k": K}))
    clients = [str(i + 1) for i in range(n_sites)]
    relay = LocalRelay(clients, clients[0])
    instances, outcome = [], {}
    started = time.monotonic()
    try:
        for i, rows in enumerate(np.array_split(np.arange(n), n_sites)):
            inp, out = root / f"in{i}", root / f"out{i}"
            inp.mkdir(parents=True)
            out.mkdir(parents=True)
            (inp / svd.INPUT_FILE).write_bytes(svd.site_table(data, rows))
            (inp / "config.yml").write_text(config)
            instances.append(start_instance(REPO / "apps" / "federated_svd", inp, out, root / f"app{i}.log",
                                            FAST.engine_waits))
        startup = time.monotonic() - started
        deadline = time.monotonic() + LIMIT

        def client(i: int) -> None:
            try:
                drive(instances[i], client_id=clients[i], coordinator_id=clients[0], clients=clients,
                      relay=relay.endpoint(clients[i]), query_interval=FAST.query_interval,
                      first_poll=FAST.first_poll,
                      cancelled=lambda: "time limit" if time.monotonic() > deadline else None)
                outcome[i] = "finished"
            except AppFailed as e:
                outcome[i] = str(e)

        run_started = time.monotonic()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(n_sites)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        run_time = time.monotonic() - run_started
    finally:
        for instance in instances:
            instance.stop()
    if set(outcome.values()) != {"finished"}:
        raise SystemExit(f"{n_sites} sites: {outcome}; see the app logs in {root}")
    iterations = svd.read_result(root / "out0")["iterations"]
    traffic = relay.traffic()
    t = [datetime.fromisoformat(m["time"]).timestamp() for m in traffic]
    broadcasts = [ti for ti, m in zip(t, traffic, strict=True) if m["sender"] == clients[0] and m["destination"] == "all"]
    gaps = np.diff(broadcasts)
    latencies = []  # last participant share before each broadcast → that broadcast
    for b in broadcasts[1:]:
        shares = [ti for ti, m in zip(t, traffic, strict=True) if m["sender"] != clients[0] and ti <= b]
        if shares:
            latencies.append(b - max(shares))
    participant_bytes = [sum(m["bytes"] for m in traffic if m["sender"] == c) for c in clients[1:]]
    return {
        "sites": n_sites, "startup_s": round(startup, 2), "run_s": round(run_time, 2), "rounds": iterations,
        "rounds_per_s": round(1 / statistics.median(gaps), 2) if len(gaps) else None,
        "rounds_per_s_whole_run": round(iterations / run_time, 2),
        "relay_latency_per_round_ms": {"median": round(1000 * statistics.median(latencies), 2),
                                       "max": round(1000 * max(latencies), 2)} if latencies else None,
        "bytes_sent_per_site_per_round": round(statistics.mean(participant_bytes) / max(iterations, 1)),
        "bytes_sent_by_coordinator_per_round": round(
            sum(m["bytes"] for m in traffic if m["sender"] == clients[0]) / max(iterations, 1)),
        "messages": len(traffic),
    }


def main() -> None:
    results = []
    for n_sites in SITES:
        with tempfile.TemporaryDirectory(prefix=f"bench-svd-{n_sites}-") as tmp:
            results.append(run_once(n_sites, Path(tmp)))
        print(json.dumps(results[-1]))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"timing": "fast", "k": K, "features": FEATURES,
                                   "samples_per_site": SAMPLES_PER_SITE, "runs": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
