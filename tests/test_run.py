"""`python -m fedsim_runner svd|mean` end to end as a user runs it: a real orchestrator process, namespace sites, the
localfc hub and controllers, ansible-runner and Dask; and what must happen when a site fails or the user interrupts."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fedsim_runner.backoff import wait_until
from fedsim_runner.cluster import Cluster
from fedsim_runner.config import load_config, read_credentials_file
from fedsim_runner.errors import RunFailed
from fedsim_runner.sites import get_provider
from tests.conftest import REPO, needs_root

pytestmark = [pytest.mark.e2e, needs_root]

RUN_FILES = ["fedsim.log", "metrics.json", "config.toml", "inventory.yml", "comparison.json", "report.html",
             "report.md", "centralized/result.json"]
MEAN_EXAMPLE = {"site1": "1,2,3,4,5", "site2": "7,9,11", "site3": "2,2,2,4,6,6,6"}  # FEATURECLOUD.md §5: 5.3333


def _project(tmp_path: Path, name: str, subnet: str, workflow: str = "svd", extra: str = "") -> Path:
    """A project file of its own (name, subnet, credentials, runs folder) so that tests never meet `make demo`."""
    sites = ""
    for i in (1, 2, 3):
        sites += f'[[sites]]\nname = "site{i}"\nfc_user = "site{i}@fedsim.test"\ncoordinator = {str(i == 1).lower()}\n'
        if workflow == "mean":
            data = tmp_path / f"site{i}.csv"
            data.write_text(MEAN_EXAMPLE[f"site{i}"] + "\n")
            sites += f'data = ["{data}"]\n'
    data = '[data]\nsource = "sklearn:wine"\nsplit = "iid"\n' if workflow == "svd" else '[data]\nsplit = "files"\n'
    params = "[workflow]\nk = 4\nreference_run = true\n" if workflow == "svd" else ""
    path = tmp_path / "project.toml"
    path.write_text(f"""
[project]
name = "{name}"
workflow = "{workflow}"
timing = "fast"
timeout = 120
outdir = "runs"
credentials = "operator.env"
{extra}
[provider]
kind = "local"
isolation = "namespace"
subnet = "{subnet}"

{data}
{params}
{sites}""")
    return path


def _start(workflow: str, project: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fedsim_runner", workflow, "--config", str(project), *args],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: a Ctrl-C reaches all of it


def _run_dir(project: Path) -> Path:
    runs = sorted((project.parent / "runs").iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def _wait_for_log(project: Path, pattern: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    def seen() -> bool:
        assert proc.poll() is None, proc.communicate()
        runs = list((project.parent / "runs").glob("*/fedsim.log")) if (project.parent / "runs").exists() else []
        return bool(runs) and re.search(pattern, runs[0].read_text()) is not None

    assert wait_until(seen, timeout, first=0.02, cap=0.1), f"never logged {pattern!r}"


def _passwords(project: Path) -> list[str]:
    return list(read_credentials_file(project.parent / "operator.env").values())


def _files_with(folder: Path, secrets: list[str]) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file() and any(s.encode() in p.read_bytes() for s in secrets)]


def _nothing_left(project: Path, run: Path, session: int) -> None:
    """No namespace, state, or process of the run remains (the sites' processes die with their namespaces)."""
    cfg = load_config(project, check_files=False)
    provider = get_provider(cfg)
    assert provider.handles() == []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [line for line in netns.splitlines() if any(f"-site{i}" in line for i in (1, 2, 3))
                and line.split()[0].startswith("fs")], netns
    leftovers = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            sid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[3])
        except (OSError, IndexError, ValueError):
            continue
        if str(run) in cmdline or sid == session:
            leftovers.append(f"{proc.name}: {cmdline[:200]}")
    assert not leftovers, leftovers


def _environ_holds(pid: int, secrets: list[str]) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return any(s.encode() in environ for s in secrets)


def _site_netns(project: Path) -> dict[str, str]:
    """{"net:[inode]": site} for the project's sites that are up."""
    found = {}
    for h in get_provider(load_config(project, check_files=False)).handles():
        try:
            inode = os.stat(Path("/run/netns") / h.extra["netns"]).st_ino
            found[f"net:[{inode}]"] = h.name
        except OSError:
            pass
    return found


def _processes():
    """(pid, "net:[inode]", session id) of every process."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                sid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[3])
                yield int(proc.name), os.readlink(proc / "ns" / "net"), sid
            except (OSError, IndexError, ValueError):
                pass


def test_svd_run_end_to_end_reproduces_the_centralized_svd_and_keeps_secrets_out(tmp_path):
    project = _project(tmp_path, "fedsim-test-run", "10.227.0.0/20")
    proc = _start("svd", project)
    # while it runs, look at the environment of every process of the run: the orchestrator's side (orchestrator, hub,
    # scheduler, ansible…) holds no password, a site's processes (worker, controller) only the site's own
    host_net = os.readlink("/proc/self/ns/net")
    seen: dict[str, set[int]] = {}
    while proc.poll() is None:
        if (project.parent / "operator.env").exists():
            password = {k.split("@")[0]: v for k, v in read_credentials_file(project.parent / "operator.env").items()}
            sites = _site_netns(project)
            for pid, net, sid in _processes():
                where = sites.get(net) or ("orchestrator" if sid == proc.pid and net == host_net else None)
                if where is None:
                    continue
                seen.setdefault(where, set()).add(pid)
                foreign = [p for site, p in password.items() if site != where]
                assert not _environ_holds(pid, foreign), f"process {pid} ({where}) holds another site's password"
        try:  # the next sample, or at once when the run ends
            proc.wait(timeout=0.05)
        except subprocess.TimeoutExpired:
            pass
    out, err = proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    assert {"orchestrator", "site1", "site2", "site3"} <= set(seen), seen  # both sides were looked at
    run = _run_dir(project)
    for name in RUN_FILES:
        assert (run / name).is_file(), name
    for site in ("site1", "site2", "site3"):
        for sub in ("input/data.tsv", "input/config.yml", "logs/controller.log"):
            assert (run / "sites" / site / sub).is_file(), (site, sub)
        assert list((run / "sites" / site / "output").glob("results_pr*_run1_step1.zip"))
        assert list((run / "sites" / site / "logs").glob("logs_pr*_run1_step1.txt"))
    comparison = json.loads((run / "comparison.json").read_text())
    assert comparison["passed"] is True and comparison["max_angle"] < 1e-6
    # fedflow's reference: the same app with the coordinator alone holding every sample, after the federated run
    assert max(comparison["reference"]["angles_reference_vs_centralized"]) < 1e-6
    assert list((run / "reference" / "site1" / "output").glob("results_pr*_run1_step1.zip"))
    assert not (run / "reference" / "site2").exists()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "ok"
    assert {p["name"] for p in metrics["phases"]} >= {"sites", "hub", "distribute", "cluster", "upload", "run",
                                                      "download", "compare", "down"}
    assert set(metrics["sites"]) == {"site1", "site2", "site3"}
    assert "largest component angle" in err + out  # the summary table
    # no password anywhere in the run directory (hub database included) nor in the output
    secrets = _passwords(project)
    assert _files_with(run, secrets) == []
    assert not any(s in out + err for s in secrets)
    _nothing_left(project, run, proc.pid)


def test_each_site_holds_only_its_own_credentials_and_cannot_read_another_sites_dotfile(tmp_path):
    project = _project(tmp_path, "fedsim-test-creds", "10.227.16.0/20", workflow="mean")
    proc = _start("mean", project, "--keep")  # the sites stay up with their dotfiles
    out, err = proc.communicate(timeout=300)
    provider = get_provider(load_config(project))
    try:
        assert proc.returncode == 0, err[-3000:]
        assert "5.333333" in out + err
        accounts = read_credentials_file(project.parent / "operator.env")
        handles = {h.name: h for h in provider.handles()}
        password = {name: accounts[f"{name}@fedsim.test"] for name in handles}
        for name, h in handles.items():
            others = [p for n, p in password.items() if n != name]
            # the site's files (its whole copy-on-write layer: home, /etc, /var, …) hold its password only
            layer = Path(h.home).parents[1]
            assert _files_with(layer, others) == [], name
            assert _files_with(layer, [password[name]]) == [str(h.home / ".fedsim" / "site.env")], name
            env = h.home / ".fedsim" / "site.env"
            assert oct(env.stat().st_mode & 0o777) == "0o600"
        with Cluster(None, handles.values(), provider, log_dir=tmp_path / "dask") as cluster:
            seen = cluster.run_on_all(os.getenv, {n: ("FC_PASSWORD",) for n in handles})
            assert seen == password  # each worker's environment has its own site's password, no other
            for reader, target in (("site1", "site2"), ("site2", "site3"), ("site3", "site1")):
                theirs = handles[target]
                for path in (f"{theirs.home_in_site}/.fedsim/site.env", str(theirs.home / ".fedsim" / "site.env")):
                    with pytest.raises(RunFailed, match=rf"site {reader}: .*(No such file|Permission denied)"):
                        cluster.run_on(reader, Path.read_text, Path(path))
    finally:
        provider.down()


def test_a_site_whose_worker_is_killed_mid_run_fails_the_run_naming_it_and_everything_stops(tmp_path):
    project = _project(tmp_path, "fedsim-test-kill", "10.227.32.0/20", workflow="mean")
    proc = _start("mean", project, "--timing", "realistic")  # the engine's real waits: the run lasts long enough
    _wait_for_log(project, r"phase run started", proc)
    cfg = load_config(project)
    netns = next(h.extra["netns"] for h in get_provider(cfg).handles() if h.name == "site2")
    worker = _worker_in(netns)
    os.kill(worker, signal.SIGKILL)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 1, err[-3000:]
    assert re.search(r"site(\(s\))? site2\b", err), err[-3000:]
    run = _run_dir(project)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "site2" in metrics["error"]
    assert (run / "sites" / "site2" / "logs" / "fedsim_runner.site_worker.log").is_file()  # logs kept
    assert (run / "sites" / "site1" / "logs" / "controller.log").stat().st_size > 0
    _nothing_left(project, run, proc.pid)


def _worker_in(netns: str) -> int:
    pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, check=True).stdout.split()
    for pid in pids:
        try:
            if b"fedsim_runner.site_worker" in Path(f"/proc/{pid}/cmdline").read_bytes() and \
                    b"nsenter" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                return int(pid)
        except OSError:
            continue
    raise AssertionError(f"no site worker in {netns}")


def test_a_malformed_data_file_at_one_site_is_the_apps_error_reported_with_the_sites_name(tmp_path):
    project = _project(tmp_path, "fedsim-test-bad", "10.227.48.0/20", workflow="mean")
    proc = _start("mean", project)
    _wait_for_log(project, r"phase distribute ok", proc)
    # the data AT site2 goes bad after FedSim checked and shipped it (as a hospital's file may)
    provider = get_provider(load_config(project))
    writer = provider.popen("site2", ["sh", "-c", "printf '7,nine,11\\n' > ~/input/data.csv"], {})
    assert writer.wait(timeout=30) == 0
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 1, err[-3000:]
    message = " ".join(err.split())
    assert "site site2" in message and "could not convert string to float" in message, message[-3000:]
    run = _run_dir(project)
    step_log = next((run / "sites" / "site2" / "logs").glob("logs_pr*_run1_step1.txt")).read_text()
    assert "Traceback" in step_log and "nine" in step_log
    _nothing_left(project, run, proc.pid)


def test_a_malformed_data_file_in_the_project_is_refused_before_anything_starts(tmp_path):
    project = _project(tmp_path, "fedsim-test-bad2", "10.227.64.0/20", workflow="mean")
    (tmp_path / "site3.csv").write_text("2,2,two\n")
    proc = _start("mean", project)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert f"{tmp_path / 'site3.csv'}:1: 'two' is not a number" in " ".join(err.split())
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    assert get_provider(load_config(project, check_files=False)).handles() == []


def test_ctrl_c_during_a_run_stops_everything_and_keeps_the_run_directory(tmp_path):
    project = _project(tmp_path, "fedsim-test-int", "10.227.80.0/20", workflow="mean")
    proc = _start("mean", project, "--timing", "realistic")
    _wait_for_log(project, r"phase (upload|run) started", proc)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground process group
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err[-3000:]
    assert "interrupted" in err
    run = _run_dir(project)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "interrupted"
    assert (run / "fedsim.log").stat().st_size > 0 and (run / "sites" / "site1" / "logs").is_dir()
    _nothing_left(project, run, proc.pid)
