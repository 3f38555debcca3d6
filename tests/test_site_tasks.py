"""Site tasks on real site workers against a real localfc hub process (and the sites' own controllers)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from fedsim_runner import site_tasks
from fedsim_runner.backoff import wait_until
from fedsim_runner.cluster import Cluster
from fedsim_runner.config import parse_config
from fedsim_runner.errors import RunFailed
from fedsim_runner.featurecloud.api import FeatureCloudClient
from fedsim_runner.sites import get_provider
from tests.conftest import free_port, needs_root
from tests.process_sites import process_sites, write_dotfile

pytestmark = pytest.mark.e2e

NAMES = ["site-a", "site-b", "site-c"]  # site-a coordinates


@contextlib.contextmanager
def _hub(folder: Path, hosts: list[str]):
    """A hub process listening on `hosts` (loopback, and the sites' gateways for namespace sites); yields its port."""
    port = free_port()
    with open(folder / "hub.log", "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedsim_runner", "hub", *(a for h in hosts for a in ("--host", h)),
             "--port", str(port), "--db", str(folder / "hub.sqlite3")], stdout=out, stderr=subprocess.STDOUT,
        )

    def up() -> bool:
        assert proc.poll() is None, (folder / "hub.log").read_text()
        try:
            return httpx.get(f"http://127.0.0.1:{port}/api/apps/", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        assert wait_until(up, 60), "hub did not start"
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def hub_url(tmp_path: Path):
    with _hub(tmp_path, ["127.0.0.1"]) as port:
        yield f"http://127.0.0.1:{port}"


def _signup(hub_url: str) -> dict[str, tuple[str, str]]:
    found = {}
    with FeatureCloudClient(hub_url) as client:
        for name in NAMES:
            email, password = f"{name}@fedsim.test", secrets.token_urlsafe(16)
            client.signup(email, password, name, "site")
            found[name] = (email, password)
    return found


@pytest.fixture
def accounts(hub_url: str) -> dict[str, tuple[str, str]]:
    """One FeatureCloud account per site on the hub: {site: (e-mail, password)} (the operator's credentials file)."""
    return _signup(hub_url)


@contextlib.contextmanager
def _sites(root: Path, hub_url: str, accounts: dict, controllers: dict[str, str] | None = None):
    dotfiles = {
        name: {"FC_USERNAME": email, "FC_PASSWORD": password, "FC_BASE_URL": hub_url,
               "FC_CONTROLLER_URL": (controllers or {}).get(name, "http://127.0.0.1:9")}
        for name, (email, password) in accounts.items()
    }
    with process_sites(root, dotfiles) as (provider, handles):
        yield SimpleNamespace(provider=provider, handles=list(handles.values()), by_name=handles)


def _holds_no_password(accounts: dict, *documents: object, folder: Path | None = None) -> None:
    texts = [json.dumps(d, default=repr) for d in documents] + list(os.environ.values())
    if folder is not None:
        texts += [p.read_text(errors="replace") for p in folder.rglob("*") if p.is_file()]
    for _, password in accounts.values():
        assert not any(password in t for t in texts)


def test_project_setup_runs_on_each_participants_own_site(hub_url, accounts, tmp_path):
    with _sites(tmp_path, hub_url, accounts) as sites, \
            Cluster(None, sites.handles, sites.provider, log_dir=tmp_path / "dask") as cluster:
        logins = cluster.run_on_all(site_tasks.login, {n: () for n in NAMES})
        assert {n: r["user"] for n, r in logins.items()} == {n: accounts[n][0] for n in NAMES}

        pid = cluster.run_on("site-a", site_tasks.create_project, "fedsim-test", "mean-app")
        app_id = cluster.run_on("site-a", site_tasks.ensure_app, "mean-app")  # already in the library: no error
        assert isinstance(pid, int) and isinstance(app_id, int)
        tokens = cluster.run_on("site-a", site_tasks.create_tokens, pid, 2)
        assert len(set(tokens)) == 2
        joined = cluster.run_on_all(site_tasks.join, {"site-b": (tokens[0],), "site-c": (tokens[1],)})
        assert joined == {"site-b": pid, "site-c": pid}

        with pytest.raises(RunFailed, match=r"site site-b: set_status failed: .*403"):
            cluster.run_on("site-b", site_tasks.set_status, pid, "prepare")
        assert cluster.run_on("site-a", site_tasks.set_status, pid, "prepare") == "prepare"
        statuses = cluster.run_on_all(site_tasks.project_status, {n: (pid,) for n in NAMES})
        assert set(statuses.values()) == {"prepare"}

        # nobody uploads: the coordinator's wait ends at its timeout, naming the site, and shuts the project down
        with pytest.raises(RunFailed, match=rf"site site-a: project {pid} still 'prepare' after 1 s; FedSim shut"):
            cluster.run_on("site-a", site_tasks.wait_for_final_status, pid, 1)
        assert cluster.run_on("site-c", site_tasks.project_status, pid) == "stopped"

        _holds_no_password(accounts, logins, pid, tokens, joined, statuses, folder=tmp_path / "dask")


def test_a_wrong_password_fails_login_naming_the_site_without_the_password(hub_url, accounts, tmp_path):
    wrong = dict(accounts, **{"site-b": (accounts["site-b"][0], "not-" + accounts["site-b"][1])})
    with _sites(tmp_path, hub_url, wrong) as sites, \
            Cluster(None, sites.handles, sites.provider, log_dir=tmp_path / "dask") as cluster:
        with pytest.raises(RunFailed, match=r"site site-b: login failed: .*401") as err:
            cluster.run_on_all(site_tasks.login, {n: () for n in NAMES})
    assert wrong["site-b"][1] not in str(err.value)


MEAN_EXAMPLE = {"site-a": "1,2,3,4,5", "site-b": "7,9,11", "site-c": "2,2,2,4,6,6,6"}  # FEATURECLOUD.md §5: 5.3333


def test_a_whole_mean_run_through_site_tasks_and_the_sites_own_controllers(hub_url, accounts, tmp_path):
    ports = {name: free_port() for name in NAMES}
    urls = {n: f"http://127.0.0.1:{p}" for n, p in ports.items()}
    with _sites(tmp_path, hub_url, accounts, urls) as sites:
        for name, line in MEAN_EXAMPLE.items():
            folder = sites.by_name[name].home / "input"
            folder.mkdir()
            (folder / "data.csv").write_text(line + "\n")
            (folder / "config.yml").write_text("fc_mean:\n  input_name: data.csv\n  output_name: output.csv\n")
        for name in NAMES:  # each site's controller, started as the site with its own dotfile loaded
            sites.provider.popen(name, [
                sys.executable, "-m", "fedsim_runner.site_env", "--", sys.executable, "-m", "fedsim_runner",
                "controller", "--site", name, "--hub", hub_url, "--host", "127.0.0.1", "--port", str(ports[name]),
                "--data-dir", str(sites.by_name[name].home / "controller"), "--timing", "fast"])
        with Cluster(None, sites.handles, sites.provider, log_dir=tmp_path / "dask") as cluster:
            pid, results = _mean_run(cluster)
    _check_mean(pid, results)
    _holds_no_password(accounts, {n: sorted(r) for n, r in results.items()}, folder=tmp_path / "dask")


def _mean_run(cluster: Cluster) -> tuple[int, dict]:
    """DESIGN §4 step 4 as the orchestrator drives it: coordinator site-a, participants in parallel."""
    pid = cluster.run_on("site-a", site_tasks.create_project, "fedsim-mean", "mean-app")
    tokens = cluster.run_on("site-a", site_tasks.create_tokens, pid, 2)
    cluster.run_on_all(site_tasks.join, {"site-b": (tokens[0],), "site-c": (tokens[1],)})
    cluster.run_on("site-a", site_tasks.set_status, pid, "prepare")
    uploaded = cluster.run_on_all(site_tasks.upload_and_finalise, {n: (pid, "input") for n in NAMES})
    assert uploaded["site-b"]["files"] == ["config.yml", "data.csv"]
    assert cluster.run_on("site-a", site_tasks.wait_for_final_status, pid, 120) == "finished"
    return pid, cluster.run_on_all(site_tasks.download_results, {n: (pid,) for n in NAMES})


def _check_mean(pid: int, results: dict) -> None:
    for name in NAMES:
        zips = [f for f in results[name] if f.endswith(".zip")]
        assert zips == [f"results_pr{pid}_run1_step1.zip"], results[name].keys()
        with zipfile.ZipFile(io.BytesIO(results[name][zips[0]])) as z:
            text = z.read(next(n for n in z.namelist() if n.endswith("output.csv"))).decode()
        assert abs(float(text.strip().split(",")[-1]) - 16 / 3) < 1e-9, text


NAMESPACE_PROJECT = """
[project]
name = "fedsim-test-tasks"
workflow = "mean"

[provider]
kind = "local"
isolation = "namespace"
subnet = "10.223.128.0/17"
""" + "".join(f'[[sites]]\nname = "{n}"\nfc_user = "{n}@fedsim.test"\ncoordinator = {str(n == NAMES[0]).lower()}\n'
              for n in NAMES)


def _site_shell(provider, site: str, script: str, stdin: bytes = b"") -> None:
    proc = provider.popen(site, ["sh", "-c", script], {}, stdin=subprocess.PIPE)
    proc.communicate(stdin, timeout=30)
    assert proc.returncode == 0, script


@needs_root
def test_a_whole_mean_run_across_namespace_sites(tmp_path):
    provider = get_provider(parse_config(NAMESPACE_PROJECT, tmp_path / "project.toml"))
    try:
        handles = {h.name: h for h in provider.up()}
        with _hub(tmp_path, ["127.0.0.1", *sorted({h.gateway for h in handles.values()})]) as port:
            accounts = _signup(f"http://127.0.0.1:{port}")
            for name, h in handles.items():
                hub = f"http://{h.gateway}:{port}"
                write_dotfile(provider, name, {"FC_USERNAME": accounts[name][0], "FC_PASSWORD": accounts[name][1],
                                               "FC_BASE_URL": hub, "FC_CONTROLLER_URL": f"http://{h.address}:{h.port_base}"})
                _site_shell(provider, name, "mkdir -p ~/input && cat > ~/input/data.csv",
                            (MEAN_EXAMPLE[name] + "\n").encode())
                _site_shell(provider, name, "cat > ~/input/config.yml",
                            b"fc_mean:\n  input_name: data.csv\n  output_name: output.csv\n")
                provider.popen(name, ["sh", "-c", f'exec {sys.executable} -m fedsim_runner.site_env -- {sys.executable} '
                                      f'-m fedsim_runner controller --site {name} --hub {hub} --host {h.address} '
                                      f'--port {h.port_base} --data-dir "$HOME/controller" --timing fast'], {})
            with Cluster(None, handles.values(), provider, log_dir=tmp_path / "dask") as cluster:
                pid, results = _mean_run(cluster)
        _check_mean(pid, results)
        _holds_no_password(accounts, {n: sorted(r) for n, r in results.items()}, folder=tmp_path / "dask")
    finally:
        provider.down()
