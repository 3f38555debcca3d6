"""services.yml, collect.yml and reset.yml over real SSH into 2 namespace sites (root), platform local.

What the services need and only provisioning (site.yml, minutes) installs is given the cheap way, nothing faked:
FedSim's venv is the repo's .venv (namespace sites see it, as `python -m fedsim_runner` runs use it), and
fedsim_base's own supervisor template is rendered onto every host (in each site's private /tmp). The site dotfiles
come from distribute.yml, the accounts from a real localfc hub on the sites' gateways. Range 10.226.0.0/16.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from fedsim_runner.ansible import run_playbook
from fedsim_runner.backoff import wait_until
from fedsim_runner.config import load_config
from fedsim_runner.errors import RunFailed
from fedsim_runner.featurecloud.api import FeatureCloudClient
from fedsim_runner.sites import get_provider
from tests.conftest import REPO, free_port, needs_root

pytestmark = [needs_root, pytest.mark.e2e, pytest.mark.root]
SITES = ("kilo", "lima")
PASSWORDS = {f"{s}@example.org": f"pw-{s}-svc" for s in SITES}
CONTROLLER_DATA = ".fedsim/controller"  # fedsim_featurecloud_data_dir, relative to the site user's home

# the part of fedsim_base (install) services.yml relies on: its supervisor script, from the role's own template
SETUP = """\
- name: Test setup | fedsim_base's process supervisor
  hosts: all
  gather_facts: false
  become: true
  tasks:
    - name: Its folder
      ansible.builtin.file:
        path: "{{ fedsim_test_supervisor | dirname }}"
        state: directory
        mode: "0755"
    - name: The supervisor
      ansible.builtin.template:
        src: "{{ fedsim_test_supervisor_template }}"
        dest: "{{ fedsim_test_supervisor }}"
        mode: "0755"
"""


@dataclass
class Env:
    provider: object
    handles: dict
    inventory: Path
    extravars: dict

    def run(self, playbook: str, **extra) -> dict:
        return run_playbook(playbook, self.inventory, {**self.extravars, **extra})

    def in_site(self, site: str, argv: list[str], user: bool = True) -> tuple[int, str]:
        proc = self.provider.popen(site, argv, env={}, user=user, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out = proc.communicate(timeout=30)[0].decode()
        return proc.returncode, out

    def pids(self, site: str, pattern: str, user: str | None = None) -> list[int]:
        """PIDs inside the site (its own PID namespace) whose command line matches, optionally of one user."""
        argv = ["pgrep", "-f", pattern] + (["-u", user] if user else [])
        return [int(p) for p in self.in_site(site, argv, user=False)[1].split()]

    def write_as_site(self, site: str, relpath: str, text: str) -> None:
        """A file in the site user's home, written by the site user (so owner and mode are the site's own)."""
        code, out = self.in_site(site, ["/bin/sh", "-c", 'mkdir -p "$(dirname "$1")" && printf %s "$2" >"$1"', "-",
                                        relpath, text])
        assert code == 0, out


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("svc")
    (tmp / "p.toml").write_text(textwrap.dedent("""\
        [project]
        name = "fstest-svc"
        workflow = "mean"
        [provider]
        isolation = "namespace"
        subnet = "10.226.0.0/16"
        """) + "".join(f'[[sites]]\nname = "{s}"\nfc_user = "{s}@example.org"\ncoordinator = {str(i == 0).lower()}\n'
                       for i, s in enumerate(SITES)))
    provider = get_provider(load_config(tmp / "p.toml"))
    # one folder on the host (the scheduler's pidfile and the orchestrator's supervisor) and the same path in each
    # site's private /tmp: a fixed role variable has one value for every host
    scratch = Path(f"/tmp/fedsim-svc-{uuid.uuid4().hex[:8]}")
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, scratch, ignore_errors=True)
        stack.callback(provider.down)
        handles = {h.name: h for h in provider.up()}
        inventory = provider.inventory(output=tmp / "inventory.yml")
        hub_port = _hub(stack, tmp, [h.gateway for h in handles.values()])
        with FeatureCloudClient(f"http://127.0.0.1:{hub_port}") as hub:
            for user, password in PASSWORDS.items():
                hub.signup(user, password, user.split("@")[0], "site")
        venv, supervisor = str(REPO / ".venv"), f"{scratch}/fedsim-supervise"
        extravars = {
            "fedsim_fc_hub_port": hub_port,
            "fedsim_featurecloud_fedsim_venv": venv, "fedsim_dask_venv": venv,
            "fedsim_featurecloud_supervisor": supervisor, "fedsim_dask_supervisor": supervisor,
            "fedsim_dask_state_dir": f"{scratch}/dask",
            "fedsim_dask_scheduler_port": free_port(),
        }
        (tmp / "setup.yml").write_text(SETUP)
        template = REPO / "roles" / "fedsim_base" / "templates" / "fedsim-supervise.sh.j2"
        run_playbook(tmp / "setup.yml", inventory, {"fedsim_test_supervisor": supervisor,
                                                    "fedsim_test_supervisor_template": str(template)})
        run_playbook("distribute.yml", inventory, extravars, secrets={"fedsim_credentials": PASSWORDS})
        stack.callback(_stop_scheduler, scratch / "dask")  # the one service outside the sites
        yield Env(provider, handles, inventory, extravars)


def _hub(stack: ExitStack, tmp: Path, gateways: list[str]) -> int:
    port = free_port()
    hosts = [a for h in ["127.0.0.1", *gateways] for a in ("--host", h)]
    with open(tmp / "hub.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "fedsim_runner", "hub", *hosts, "--port", str(port),
                                 "--db", str(tmp / "hub.sqlite3")], stdout=log, stderr=subprocess.STDOUT)
    stack.callback(_stop, proc)

    def up() -> bool:
        assert proc.poll() is None, (tmp / "hub.log").read_text()[-2000:]
        try:
            return httpx.get(f"http://127.0.0.1:{port}/api/apps/", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    assert wait_until(up, 60), "hub did not start"
    return port


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _scheduler_pid(state_dir: Path | str) -> int | None:
    """The supervised scheduler's PID while it runs (a recorded PID counts only while it is still the scheduler)."""
    pidfile = Path(state_dir) / "scheduler.pid"
    try:
        pid = int(pidfile.read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ValueError):
        return None
    return pid if b"distributed.cli.dask_scheduler" in cmdline else None


def _stop_scheduler(state_dir: Path) -> None:
    """A scheduler a failed test left running: its process group, by the PID the supervisor recorded."""
    if pid := _scheduler_pid(state_dir):
        os.killpg(pid, signal.SIGKILL)


def _workers(env: Env) -> set[str]:
    from distributed import Client

    with Client(f"tcp://127.0.0.1:{env.extravars['fedsim_dask_scheduler_port']}", timeout=10) as client:
        return {w["name"] for w in client.scheduler_info()["workers"].values()}


def _tail(path: Path) -> str:
    return path.read_text()[-2000:] if path.exists() else f"{path}: missing"


def _controller_answers(h) -> bool:
    try:
        return httpx.get(f"http://{h.address}:{h.port_base}/ping/", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_services_start_as_the_site_user_once_and_stop(env):
    first = env.run("services.yml", fedsim_services_state="started")
    assert all(first["changed"].get(h, 0) > 0 for h in ("localhost", *SITES)), first["changed"]
    assert _scheduler_pid(env.extravars["fedsim_dask_state_dir"])
    for site, h in env.handles.items():
        for what in ("fedsim_runner controller", "fedsim_runner.site_worker"):
            assert env.pids(site, what, user=site), f"{site}: no {what} running as {site}"
            assert not env.pids(site, what, user="root"), f"{site}: {what} runs as root"
        # the controller is the site's own (its dotfile's account, registered with the hub) and serves its port
        assert wait_until(lambda h=h: _controller_answers(h), 30), (
            f"{site}: controller does not answer: {_tail(Path(h.home) / 'logs' / 'controller.log')}")
        assert (Path(h.home) / CONTROLLER_DATA / "site_info.json").is_file()
    # each site's worker reached the orchestrator's scheduler, named after its site
    assert wait_until(lambda: _workers(env) == set(SITES), 30), _workers(env)

    again = env.run("services.yml", fedsim_services_state="started")
    assert sum(again["changed"].values()) == 0, again["changed"]

    stopped = env.run("services.yml", fedsim_services_state="stopped")
    assert all(stopped["changed"].get(h, 0) > 0 for h in ("localhost", *SITES)), stopped["changed"]
    assert _scheduler_pid(env.extravars["fedsim_dask_state_dir"]) is None
    for site, h in env.handles.items():
        for what in ("fedsim_runner controller", "fedsim_runner.site_worker"):
            assert not env.pids(site, what), f"{site}: {what} still running"
        assert not _controller_answers(h)


def test_collect_brings_each_sites_files_into_its_own_folder(env, tmp_path):
    run_dir = tmp_path / "run"
    expected = {}
    for site in SITES:
        files = {
            "logs/controller.log": f"{site} controller log\n",
            "logs/deep/er/trace.txt": f"{site} trace\n",
            "output/result.csv": f"{site},1.5\n",
            f"{CONTROLLER_DATA}/workflows/Project_7/Run_1/results_pr7_run1_step1.zip": f"{site} zip bytes",
            f"{CONTROLLER_DATA}/workflows/Project_7/Run_1/logs_pr7_run1_step1.txt": f"{site} step log\n",
        }
        for rel, text in files.items():
            env.write_as_site(site, rel, text)
        # the site's data stays on the site: uploads and the run's input copy are not results
        env.write_as_site(site, f"{CONTROLLER_DATA}/uploads/Project_7/data.csv", "private\n")
        env.write_as_site(site, f"{CONTROLLER_DATA}/workflows/Project_7/Run_1/input/data.csv", "private\n")
        expected[site] = {
            "logs/controller.log": files["logs/controller.log"],
            "logs/deep/er/trace.txt": files["logs/deep/er/trace.txt"],
            "output/result.csv": files["output/result.csv"],
            "controller/Project_7/Run_1/results_pr7_run1_step1.zip": f"{site} zip bytes",
            "controller/Project_7/Run_1/logs_pr7_run1_step1.txt": f"{site} step log\n",
        }
    first = env.run("collect.yml", fedsim_run_dir=str(run_dir))
    assert all(first["changed"].get(s, 0) > 0 for s in SITES), first["changed"]
    assert sorted(p.name for p in (run_dir / "sites").iterdir()) == sorted(SITES)
    for site in SITES:
        root = run_dir / "sites" / site
        got = {p.relative_to(root).as_posix(): p.read_text() for p in root.rglob("*") if p.is_file()}
        # the logs folder may also hold what the services wrote there (controller, Dask worker): only this site's
        got = {k: v for k, v in got.items() if k in expected[site] or not k.startswith("logs/")}
        assert got == expected[site]
        for other in SITES:
            if other != site:
                assert other not in "".join(p.read_text() for p in root.rglob("*") if p.is_file())
    again = env.run("collect.yml", fedsim_run_dir=str(run_dir))
    assert sum(again["changed"].values()) == 0, again["changed"]


def test_reset_clears_only_featurecloud_state_and_changes_nothing_the_second_time(env):
    env.run("services.yml", fedsim_services_state="started")
    try:
        keep = {"notes.txt": "mine\n", "input/data.csv": "1,2,3\n", "output/result.csv": "r\n", "logs/own.log": "l\n"}
        for site, h in env.handles.items():
            assert wait_until(lambda h=h: _controller_answers(h), 30)
            for rel, text in keep.items():
                env.write_as_site(site, rel, text)
            env.write_as_site(site, f"{CONTROLLER_DATA}/uploads/Project_3/data.csv", "upload\n")
            env.write_as_site(site, f"{CONTROLLER_DATA}/workflows/Project_3/Run_1/run.json", "{}")
            env.write_as_site(site, f"{CONTROLLER_DATA}/.hidden", "x")
        dotfiles = {s: (Path(h.home) / ".fedsim" / "site.env").read_text() for s, h in env.handles.items()}

        first = env.run("reset.yml")
        assert all(first["changed"].get(s, 0) > 0 for s in SITES), first["changed"]
        for site, h in env.handles.items():
            home = Path(h.home)
            data = home / CONTROLLER_DATA
            assert data.is_dir() and list(data.iterdir()) == []  # site_info.json, uploads, workflows, pidfile: gone
            assert not env.pids(site, "fedsim_runner controller")
            assert not _controller_answers(h)
            for rel, text in keep.items():
                assert (home / rel).read_text() == text
            assert (home / ".fedsim" / "site.env").read_text() == dotfiles[site]
            # the Dask worker is not FeatureCloud's: it keeps running
            assert env.pids(site, "fedsim_runner.site_worker", user=site)

        again = env.run("reset.yml")
        assert sum(again["changed"].values()) == 0, again["changed"]
    finally:
        env.run("services.yml", fedsim_services_state="stopped")


def test_an_unknown_state_is_refused_before_anything_starts(env):
    with pytest.raises(RunFailed, match="fedsim_services_state must be started or stopped, not start"):
        env.run("services.yml", fedsim_services_state="start")
    assert _scheduler_pid(env.extravars["fedsim_dask_state_dir"]) is None
    for site in SITES:
        assert not env.pids(site, "fedsim_runner")


def test_controllers_only_leave_dask_to_the_run(env):
    """What a FedSim run on featurecloud.ai asks for: the controllers, without the playbook's own Dask."""
    started = env.run("services.yml", fedsim_services_state="started", fedsim_services_dask=False)
    try:
        assert "localhost" not in {h for h, n in started["changed"].items() if n}, started["changed"]
        assert _scheduler_pid(env.extravars["fedsim_dask_state_dir"]) is None
        for site, h in env.handles.items():
            assert env.pids(site, "fedsim_runner controller", user=site)
            assert not env.pids(site, "fedsim_runner.site_worker"), f"{site}: a Dask worker was started"
            assert wait_until(lambda h=h: _controller_answers(h), 30)
    finally:
        stopped = env.run("services.yml", fedsim_services_state="stopped", fedsim_services_dask=False)
    assert all(stopped["changed"].get(s, 0) > 0 for s in SITES), stopped["changed"]
    for site, h in env.handles.items():
        assert not env.pids(site, "fedsim_runner controller") and not _controller_answers(h)
