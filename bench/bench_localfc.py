"""Benchmark: federated SVD (iterative path) through the localfc hub with 3, 10 and 30 sites, fast timing.

Real processes: a hub, one controller per site (own user, own data dir), one app instance per site. Measured per run:
wall time of the app step at the coordinator, rounds (the app's iterations from run_log.txt), rounds per second
(from the time between the coordinator's broadcasts of the subspace; also over the whole step, start-up included),
relay latency (a message's send at one controller to its arrival at the receiving controller, both on this machine's
clock; per round the slowest message of that round's memo), and bytes each site sent per round (what the authors of
federated SVD report). Writes bench/results/localfc.json.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fedsim_runner.backoff import wait_until  # noqa: E402
from fedsim_runner.data import Dataset  # noqa: E402
from fedsim_runner.featurecloud.api import FeatureCloudAPI  # noqa: E402
from fedsim_runner.workflows import svd  # noqa: E402

SITES = [3, 10, 30]
K, FEATURES, SAMPLES_PER_SITE = 5, 200, 20  # features > 20·k: the randomized subspace-iteration path
NOISE = 8.0
RESULTS = REPO / "bench" / "results" / "localfc.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(argv: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fedsim_runner", *argv], cwd=REPO,
                            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONUNBUFFERED": "1", **env},
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)


def up(url: str, proc: subprocess.Popen) -> bool:
    if proc.poll() is not None:
        raise RuntimeError(f"{url}: process exited with {proc.returncode}")
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def relay_latencies(metrics: list[dict]) -> dict[str, float]:
    """Per memo (round): the slowest send→arrival among its messages, matched by sender client id and memo."""
    sent = {}
    for m in metrics:
        for msg in m["messages"]:
            if "sent" in msg:
                sent[(m["clientId"], msg["memo"])] = msg["sent"]
    per_round: dict[str, float] = {}
    for m in metrics:
        for msg in m["messages"]:
            if "received" in msg and (msg["from"], msg["memo"]) in sent:
                latency = msg["received"] - sent[(msg["from"], msg["memo"])]
                per_round[str(msg["memo"])] = max(per_round.get(str(msg["memo"]), 0.0), latency)
    return per_round


def run_once(n_sites: int, root: Path) -> dict:
    hub_port = free_port()
    hub_url = f"http://127.0.0.1:{hub_port}"
    procs = [start(["hub", "--port", str(hub_port), "--db", str(root / "hub.sqlite3")], {}, root / "hub.log")]
    try:
        assert wait_until(lambda: up(hub_url + "/api/apps/", procs[0]), 60), "hub did not start"
        sites = []
        for i in range(n_sites):
            user, password = f"site{i}@bench.local", os.urandom(12).hex()
            api = FeatureCloudAPI(hub_url)
            api.signup(user, password, first_name=f"site{i}", last_name="bench")
            api.login(user, password)
            port = free_port()
            procs.append(start(["controller", "--site", f"site{i}", "--hub", hub_url, "--port", str(port),
                                "--data-dir", str(root / f"site{i}"), "--timing", "fast"],
                               {"FC_USERNAME": user, "FC_PASSWORD": password}, root / f"controller{i}.log"))
            sites.append((api, f"http://127.0.0.1:{port}", root / f"site{i}", procs[-1]))
        for _, url, _, proc in sites:
            assert wait_until(lambda u=url, p=proc: up(u + "/ping/", p), 120), f"controller {url} did not start"

        rng = np.random.default_rng(n_sites)
        n = SAMPLES_PER_SITE * n_sites
        # noise close enough to the signal that the subspace iteration needs many rounds, as on real data
        X = (rng.standard_normal((n, K)) * [5.0, 4.5, 4.0, 3.5, 3.0]) @ rng.standard_normal((K, FEATURES))
        X += NOISE * rng.standard_normal(X.shape)
        data = Dataset("bench", X, [f"s{i}" for i in range(n)], [f"f{j}" for j in range(FEATURES)])
        config = yaml.safe_dump(svd.app_config({**svd.DEFAULTS, "k": K})).encode()

        coord = sites[0][0]
        app_id = next(a["id"] for a in coord.apps() if a["slug"] == svd.APP_SLUG)
        coord.purchase_app(app_id)
        pid = coord.create_project(f"bench {n_sites}", "bench_localfc")["id"]
        coord.set_workflow(pid, [app_id])
        for api, *_ in sites[1:]:
            api.join_project(coord.create_token(pid)["token"])
        coord.set_project_status(pid, "prepare")
        for i, (_, url, _, _) in enumerate(sites):
            rows = np.arange(i * SAMPLES_PER_SITE, (i + 1) * SAMPLES_PER_SITE)
            for name, body in {svd.INPUT_FILE: svd.site_table(data, rows), "config.yml": config}.items():
                httpx.post(url + "/file-upload/", params={"projectId": pid, "fileName": name, "finalize": "false"},
                           content=body, timeout=60).raise_for_status()
        started = time.time()
        for _, url, _, _ in sites:
            httpx.post(url + "/file-upload/", params={"projectId": pid, "fileName": "", "finalize": "true"},
                       timeout=60).raise_for_status()
        status = wait_until(lambda: (s := coord.project(pid)["status"]) in ("finished", "error", "stopped") and s,
                            900, cap=0.2)
        finished = time.time()
        if status != "finished":
            raise RuntimeError(f"{n_sites} sites: the run ended {status!r}; logs in {root}")

        def metrics_of(data_dir: Path) -> dict | None:
            found = list((data_dir / "workflows" / f"Project_{pid}").glob("Run_*/metrics.json"))
            return found and json.loads(found[0].read_text())
        metrics = [wait_until(lambda d=d: metrics_of(d), 60) for _, _, d, _ in sites]
        zip_path = next((sites[0][2] / "workflows" / f"Project_{pid}").glob("Run_*/results_*_step1.zip"))
        with zipfile.ZipFile(zip_path) as z:
            z.extractall(root / "coordinator-result")
        result = svd.read_result(root / "coordinator-result")
        rounds = int(result.get("iterations", 0)) or 1
        wall = metrics[0]["steps"][0]["wall"]
        # one round = one broadcast of the coordinator (the new subspace) to the next one
        broadcasts = [m["sent"] for m in metrics[0]["messages"] if "sent" in m and m["to"] == "all"]
        round_times = np.diff(broadcasts)[1:]  # the first gap holds the centring/scaling exchange
        latencies = list(relay_latencies(metrics).values())
        sent = [m["sent_bytes"] for m in metrics]
        return {
            "sites": n_sites, "features": FEATURES, "samples_per_site": SAMPLES_PER_SITE, "k": K,
            "run_wall_s": round(finished - started, 3), "app_step_wall_s": round(wall, 3),
            "rounds": rounds, "rounds_per_s_whole_step": round(rounds / wall, 3),
            "round_s": {"median": round(float(np.median(round_times)), 4), "max": round(float(max(round_times)), 4)}
            if len(round_times) else None,
            "rounds_per_s": round(1 / float(np.median(round_times)), 2) if len(round_times) else None,
            "relay_latency_per_round_s": {
                "median": round(statistics.median(latencies), 4) if latencies else None,
                "max": round(max(latencies), 4) if latencies else None, "rounds_measured": len(latencies)},
            "bytes_per_site_per_round": {
                "coordinator": round(sent[0] / rounds), "participant_mean": round(statistics.mean(sent[1:]) / rounds),
                "participant_max": round(max(sent[1:]) / rounds)},
            "bytes_total": {"sent": sum(sent), "received": sum(m["received_bytes"] for m in metrics)},
        }
    finally:
        stop(procs[1:])
        stop(procs[:1])


def main() -> None:
    """`bench_localfc.py [N ...]`: only these site counts, replacing their rows in the results file."""
    counts = [int(a) for a in sys.argv[1:]] or SITES
    previous = json.loads(RESULTS.read_text())["runs"] if RESULTS.exists() and sys.argv[1:] else []
    results = [r for r in previous if r["sites"] not in counts]
    for n in counts:
        with tempfile.TemporaryDirectory(prefix=f"bench-localfc-{n}-") as tmp:
            row = run_once(n, Path(tmp))
        print(json.dumps(row), flush=True)
        results.append(row)
    results.sort(key=lambda r: r["sites"])
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"benchmark": "localfc federated SVD, iterative path, fast timing",
                                   "machine_cpus": os.cpu_count(), "runs": results}, indent=2))
    print(f"written {RESULTS}")


if __name__ == "__main__":
    main()
