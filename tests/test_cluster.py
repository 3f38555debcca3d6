"""The Dask cluster with real processes: a scheduler and one worker per site, started as the sites would start them."""

from __future__ import annotations

import json
import operator
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from fedsim_runner.cluster import Cluster
from fedsim_runner.config import parse_config
from fedsim_runner.errors import RunFailed
from fedsim_runner.runlog import RunDir
from fedsim_runner.site_tasks import site_identity
from tests.conftest import REPO, needs_root
from tests.process_sites import process_sites, write_dotfile

pytestmark = pytest.mark.e2e

# Tasks must be importable on the sites (Dask pickles functions by reference): fedsim_runner's own or the stdlib's.
NAMES = ["site-a", "site-b", "site-c"]


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[SimpleNamespace]:
    dotfiles = {name: {"FC_USERNAME": f"{name}@fedsim.test", "FC_PASSWORD": f"secret-{name}",
                       "FC_BASE_URL": "http://127.0.0.1:9", "FC_CONTROLLER_URL": "http://127.0.0.1:9"} for name in NAMES}
    with process_sites(tmp_path, dotfiles) as (provider, handles):
        yield SimpleNamespace(provider=provider, handles=list(handles.values()), by_name=handles)


def _all_gone(pids: list[int]) -> bool:
    return not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)


def test_pinned_tasks_run_on_their_site_and_values_move_through_the_orchestrator(sites, tmp_path):
    steps = []
    run = RunDir.create(tmp_path / "runs", "test")
    cluster = Cluster(run, sites.handles, sites.provider, log_dir=tmp_path / "dask", on_step=lambda *a: steps.append(a))
    with run, cluster:
        assert cluster.connected_sites() == set(NAMES)
        seen = cluster.run_on_all(site_identity, {n: () for n in NAMES})
        for name in NAMES:
            assert seen[name]["site"] == name
            assert seen[name]["home"] == str(sites.by_name[name].home)
        assert len({s["pid"] for s in seen.values()}) == 3
        # a value computed on one site reaches another only as a plain argument
        first = cluster.run_on("site-a", operator.add, 2, 3)
        assert cluster.run_on("site-b", operator.add, first, 10) == 15
        assert cluster.run_on("site-c", int, "7", base=8) == 7  # keyword arguments reach the task
        pids = cluster.pids()
        children = [c.pid for p in pids for c in psutil.Process(p).children(recursive=True)]
    assert {(s, step) for s, step, _ in steps} >= {(n, "site_identity") for n in NAMES} | {("site-b", "add")}
    assert all(seconds >= 0 for *_, seconds in steps)
    metrics = json.loads((run.path / "metrics.json").read_text())
    assert [s["name"] for s in metrics["sites"]["site-c"]["steps"]] == ["site_identity", "int"]
    assert len(pids) == 4
    assert _all_gone(pids + children)
    assert (tmp_path / "dask" / "dask-scheduler.log").stat().st_size > 0


def test_killed_worker_fails_the_task_naming_the_site_within_the_timeout(sites, tmp_path):
    with Cluster(None, sites.handles, sites.provider, log_dir=tmp_path / "dask") as cluster:
        victim = cluster.run_on("site-b", site_identity)["pid"]

        def kill_once_running() -> None:
            while not any(cluster.client.processing().values()):
                time.sleep(0.01)  # test side only: waits until the task runs on the site
            os.kill(victim, 9)

        killer = threading.Thread(target=kill_once_running, daemon=True)
        killer.start()
        t0 = time.monotonic()
        with pytest.raises(RunFailed, match="site-b") as err:
            cluster.run_on("site-b", time.sleep, 120, timeout=30)
        elapsed = time.monotonic() - t0
        assert elapsed < 30, elapsed
        assert "sleep" in str(err.value)
        # the other sites keep working
        assert cluster.run_on("site-a", operator.add, 1, 1) == 2
        # a new task for the dead site fails at once, also naming it
        with pytest.raises(RunFailed, match="site-b"):
            cluster.run_on_all(operator.add, {"site-a": (1, 2), "site-b": (3, 4)}, timeout=30)
        pids = cluster.pids()
    assert _all_gone(pids)


def test_a_site_without_its_dotfile_is_named_and_nothing_is_left_running(sites, tmp_path):
    (sites.by_name["site-c"].home / ".fedsim" / "site.env").unlink()
    cluster = Cluster(None, sites.handles, sites.provider, log_dir=tmp_path / "dask", connect_timeout=30)
    t0 = time.monotonic()
    with pytest.raises(RunFailed, match="site site-c: its dask worker exited with code 1 before connecting: .*"
                       r"site.env: missing FEDSIM_SITE.*; run distribute.yml for this site \(log: "):
        cluster.start()
    assert time.monotonic() - t0 < 30
    assert cluster.pids() == []


def test_failure_inside_the_block_stops_every_process(sites, tmp_path):
    pids: list[int] = []
    with pytest.raises(RunFailed, match="site site-a: add failed: TypeError"):
        with Cluster(None, sites.handles, sites.provider, log_dir=tmp_path / "dask") as cluster:
            pids = cluster.pids()
            cluster.run_on("site-a", operator.add, 1, "x")
    assert len(pids) == 4 and _all_gone(pids)


def test_a_task_that_outlives_its_timeout_names_the_site(sites, tmp_path):
    with Cluster(None, sites.handles[:1], sites.provider, log_dir=tmp_path / "dask") as cluster:
        t0 = time.monotonic()
        with pytest.raises(RunFailed, match=r"site\(s\) site-a: sleep did not finish within 1 s"):
            cluster.run_on("site-a", time.sleep, 60, timeout=1)
        assert time.monotonic() - t0 < 5
        pids = cluster.pids()
    assert _all_gone(pids)


CTRL_C_SCRIPT = """
import sys, time
from pathlib import Path
from fedsim_runner.cluster import Cluster
from tests.process_sites import process_sites
values = {"FC_USERNAME": "u", "FC_PASSWORD": "x", "FC_BASE_URL": "http://127.0.0.1:9", "FC_CONTROLLER_URL": "http://127.0.0.1:9"}
with process_sites(Path(sys.argv[1]), {"site-a": values, "site-b": values}) as (provider, handles):
    with Cluster(None, handles.values(), provider, log_dir=Path(sys.argv[1]) / "dask") as cluster:
        print(" ".join(map(str, cluster.pids())), flush=True)
        cluster.run_on("site-a", time.sleep, 120)
"""


def test_ctrl_c_stops_every_process(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", CTRL_C_SCRIPT, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) == 3, proc.stderr.read()
    children = [c.pid for p in pids for c in psutil.Process(p).children(recursive=True)]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert "KeyboardInterrupt" in err
    assert _all_gone(pids + children)


NAMESPACE_PROJECT = """
[project]
name = "fedsim-test-cluster"
workflow = "mean"

[provider]
kind = "local"
isolation = "namespace"
subnet = "10.223.0.0/17"

[[sites]]
name = "ca"
coordinator = true
fc_user = "ca@fedsim.test"

[[sites]]
name = "cb"
fc_user = "cb@fedsim.test"
"""


@needs_root
def test_namespace_sites_run_their_workers_as_their_users_and_keep_their_credentials(tmp_path):
    from fedsim_runner.sites import get_provider

    cfg = parse_config(NAMESPACE_PROJECT, tmp_path / "project.toml")
    provider = get_provider(cfg)
    passwords = {s.name: secrets.token_urlsafe(16) for s in cfg.sites}
    try:
        handles = {h.name: h for h in provider.up()}
        for name, h in handles.items():
            write_dotfile(provider, name, {
                "FC_USERNAME": f"{name}@fedsim.test", "FC_PASSWORD": passwords[name],
                "FC_BASE_URL": f"http://{h.gateway}:9", "FC_CONTROLLER_URL": f"http://{h.address}:9"})
        with Cluster(None, handles.values(), provider, log_dir=tmp_path / "dask") as cluster:
            seen = cluster.run_on_all(site_identity, {n: () for n in handles})
            for name, h in handles.items():
                assert seen[name]["site"] == name
                assert seen[name]["user"] == h.user != "root"
                assert seen[name]["hostname"] == name
            assert cluster.run_on_all(os.getenv, {n: ("FC_USERNAME",) for n in handles}) == {
                n: f"{n}@fedsim.test" for n in handles}
            # site ca cannot read cb's dotfile: neither by its path inside cb, nor by the orchestrator's path to it
            for path in (f"{seen['cb']['home']}/.fedsim/site.env", str(handles["cb"].home / ".fedsim" / "site.env")):
                with pytest.raises(RunFailed, match=r"site ca: read_text failed: (PermissionError|FileNotFoundError)"):
                    cluster.run_on("ca", Path.read_text, Path(path))
            # no password reached a worker from outside: each read its own dotfile after it started
            for name in handles:
                root = psutil.Process(cluster.workers[name].pid)
                chain = [p for p in [root, *root.children(recursive=True)] if "fedsim_runner.site_worker" in p.cmdline()]
                assert chain
                for proc in chain:
                    environ = Path(f"/proc/{proc.pid}/environ").read_bytes()
                    assert not any(p.encode() in environ for p in passwords.values())
            # the orchestrator holds none: not in its environment, not in the files it wrote
            orchestrator = Path("/proc/self/environ").read_bytes() + "\n".join(os.environ.values()).encode()
            folders = [tmp_path / "dask", *(h.logs for h in handles.values())]
            written = b"".join(p.read_bytes() for d in folders for p in Path(d).rglob("*") if p.is_file())
            assert not any(p.encode() in orchestrator + written for p in passwords.values())
            pids = cluster.pids()
        assert _all_gone(pids)
    finally:
        provider.down()
