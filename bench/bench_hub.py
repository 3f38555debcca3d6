"""Benchmark of the localfc hub with 64 concurrent clients: login, project status GET, relay send and receive.

Starts a real hub process (temporary database), signs up 64 users who all join one running project, then lets the 64
clients (asyncio + one httpx.AsyncClient each) hammer each call. Reports requests/s and p50/p99 latency per call, and
for the relay the delivery latency (send → received by the long-polling recipient).

Run alone: `.venv/bin/python bench/bench_hub.py` → bench/results/hub.json. Bounded: fixed request counts, and the
whole run is cancelled after TIME_LIMIT seconds.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "hub.json"
CLIENTS = 64
LOGINS_PER_CLIENT = 3
STATUS_PER_CLIENT = 40
MESSAGES_PER_CLIENT = 20
PAYLOAD = 1024  # bytes per relay message
TIME_LIMIT = 300.0  # s for the whole benchmark


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summary(latencies: list[float], wall: float) -> dict:
    ordered = sorted(latencies)
    return {"requests": len(ordered), "wall_s": round(wall, 3), "requests_per_s": round(len(ordered) / wall, 1),
            "p50_ms": round(1000 * ordered[len(ordered) // 2], 2),
            "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 2),
            "mean_ms": round(1000 * statistics.fmean(ordered), 2)}


async def timed(latencies: list[float], request) -> httpx.Response:
    start = time.perf_counter()
    response = await request
    latencies.append(time.perf_counter() - start)
    response.raise_for_status()
    return response


async def wait_for_hub(url: str, process: subprocess.Popen) -> None:
    delay = 0.02
    async with httpx.AsyncClient() as http:
        while True:
            if process.poll() is not None:
                raise SystemExit(f"the hub exited with {process.returncode}")
            try:
                if (await http.get(url + "/api/apps/")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(delay)
            delay = min(delay * 1.6, 0.5)


async def setup(url: str, clients: list[httpx.AsyncClient]) -> tuple[int, int, list[str], list[str]]:
    """64 users with sites, one project they all belong to, running; returns pid, run, passwords, client ids."""
    passwords = [f"bench-password-{i}" for i in range(CLIENTS)]

    async def sign_up(i: int) -> None:
        http = clients[i]
        (await http.post("/api/auth/user/signup/", json={"email": f"u{i}@bench.org", "password": passwords[i],
                                                         "firstName": f"u{i}", "lastName": "bench"})).raise_for_status()
        tokens = (await http.post("/api/auth/login/", json={"username": f"u{i}@bench.org",
                                                            "password": passwords[i]})).json()
        http.headers["Authorization"] = f"Bearer {tokens['access']}"
        (await http.post("/api/site/", json={"name": f"site{i}"})).raise_for_status()

    await asyncio.gather(*(sign_up(i) for i in range(CLIENTS)))
    coord = clients[0]
    app_id = next(a["id"] for a in (await coord.get("/api/apps/")).json() if a["slug"] == "mean-app")
    (await coord.post(f"/api/apps/{app_id}/purchase/")).raise_for_status()
    pid = (await coord.post("/api/projects/", json={"name": "bench", "description": ""})).json()["id"]
    (await coord.put(f"/api/projects/{pid}/", json={"status": "ready", "workflow": [
        {"federatedApp": {"id": app_id}, "order": 0}]})).raise_for_status()
    for http in clients[1:]:
        token = (await coord.post(f"/api/project-tokens/{pid}/", json={"cmd": "create"})).json()["token"]
        (await http.post("/api/project-tokens/", json={"token": token, "cmd": "join"})).raise_for_status()
    (await coord.put(f"/api/projects/{pid}/", json={"status": "prepare"})).raise_for_status()
    await asyncio.gather(*(http.post(f"/api/localfc/projects/{pid}/finalize/") for http in clients))
    infos = await asyncio.gather(*(http.get(f"/api/localfc/projects/{pid}/run/") for http in clients))
    run = infos[0].json()["runNr"]
    assert run and (await coord.get(f"/api/projects/{pid}/")).json()["status"] == "running"
    return pid, run, passwords, [i.json()["clientId"] for i in infos]


async def bench_login(clients: list[httpx.AsyncClient], passwords: list[str]) -> dict:
    latencies: list[float] = []

    async def one(i: int) -> None:
        for _ in range(LOGINS_PER_CLIENT):
            await timed(latencies, clients[i].post("/api/auth/login/", json={"username": f"u{i}@bench.org",
                                                                              "password": passwords[i]}))

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(CLIENTS)))
    return summary(latencies, time.perf_counter() - start)


async def bench_status(clients: list[httpx.AsyncClient], pid: int) -> dict:
    latencies: list[float] = []

    async def one(http: httpx.AsyncClient) -> None:
        for _ in range(STATUS_PER_CLIENT):
            await timed(latencies, http.get(f"/api/projects/{pid}/"))

    start = time.perf_counter()
    await asyncio.gather(*(one(http) for http in clients))
    return summary(latencies, time.perf_counter() - start)


async def bench_relay(clients: list[httpx.AsyncClient], pid: int, run: int, ids: list[str]) -> dict:
    """Client i sends MESSAGES_PER_CLIENT messages to client i+1 while every client long-polls its own inbox."""
    send_latencies: list[float] = []
    receive_latencies: list[float] = []
    delivery: list[float] = []
    path = f"/api/localfc/relay/{pid}/{run}/"

    async def sender(i: int) -> None:
        target = ids[(i + 1) % CLIENTS]
        for k in range(MESSAGES_PER_CLIENT):
            body = json.dumps({"sent": time.time(), "k": k}).encode().ljust(PAYLOAD)
            await timed(send_latencies, clients[i].post(path, params={
                "sender": ids[i], "destination": target, "memo": f"m{k}"}, content=body))

    async def receiver(i: int) -> None:
        got = 0
        while got < MESSAGES_PER_CLIENT:
            response = await timed(receive_latencies, clients[i].get(path, params={"client": ids[i], "wait": 10}))
            if response.status_code == 200:
                delivery.append(time.time() - json.loads(response.content)["sent"])
                got += 1

    start = time.perf_counter()
    await asyncio.gather(*(sender(i) for i in range(CLIENTS)), *(receiver(i) for i in range(CLIENTS)))
    wall = time.perf_counter() - start
    return {"send": summary(send_latencies, wall), "receive": summary(receive_latencies, wall),
            "delivery": summary(delivery, wall), "messages": len(delivery), "payload_bytes": PAYLOAD}


async def main() -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-hub-") as tmp:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = open(Path(tmp) / "hub.log", "wb")  # noqa: SIM115  (closed with the process below)
        process = subprocess.Popen([sys.executable, "-m", "fedsim_runner", "hub", "--port", str(port), "--db",
                                    str(Path(tmp) / "hub.sqlite3")], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                   env={"PATH": os.environ.get("PATH", ""), "PYTHONUNBUFFERED": "1"})
        limits = httpx.Limits(max_connections=4)
        clients = [httpx.AsyncClient(base_url=url, timeout=60, limits=limits) for _ in range(CLIENTS)]
        try:
            await wait_for_hub(url, process)
            started = time.perf_counter()
            pid, run, passwords, ids = await setup(url, clients)
            setup_s = time.perf_counter() - started
            results = {
                "clients": CLIENTS, "setup_s": round(setup_s, 2),
                "login": await bench_login(clients, passwords),
                "project_status": await bench_status(clients, pid),
                "relay": await bench_relay(clients, pid, run, ids),
            }
        finally:
            for http in clients:
                await http.aclose()
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
            log.close()
    return results


if __name__ == "__main__":
    load_before = os.getloadavg()[0]
    results = asyncio.run(asyncio.wait_for(main(), TIME_LIMIT))
    # the load average says how much else ran on the machine: the numbers scale with the free CPU
    results["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                          "loadavg_1min_before": load_before, "loadavg_1min_after": os.getloadavg()[0]}
    results["note"] = ("one uvicorn process, SQLite WAL; login includes PBKDF2 password hashing (60k iterations) on "
                       "a worker thread; the machine's cores are shared with the benchmark clients")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
