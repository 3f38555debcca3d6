"""localfc end to end: a hub and 3 controllers as real processes, each controller with its own user and data dir.

Every participant's action goes through the api client as that user (FEATURECLOUD.md §2) and through its own
controller's local API (§3); the apps run as real processes on the real FeatureCloud engine.
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from scipy.linalg import subspace_angles

from fedsim_runner.backoff import wait_until
from fedsim_runner.data import Dataset
from fedsim_runner.featurecloud.api import FeatureCloudAPI
from fedsim_runner.localfc import app_folders
from fedsim_runner.workflows import mean, svd
from tests.conftest import REPO, free_port

APPS_PYTHON = REPO / ".venv-apps" / "bin" / "python"
FEATURECLOUD_CLI = REPO / ".venv-apps" / "bin" / "featurecloud"
TEST_APPS = REPO / "tests" / "apps"
RUN_TIMEOUT = 180  # seconds a run may take before the test fails

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not APPS_PYTHON.exists(), reason="needs the apps environment .venv-apps (`make venv`)"),
]



def needs_app(slug: str):
    return pytest.mark.skipif(slug not in app_folders(), reason=f"the app {slug!r} is not under apps/ yet")


MEAN_EXAMPLE = [[1, 2, 3, 4, 5], [7, 9, 11], [2, 2, 2, 4, 6, 6, 6]]  # FEATURECLOUD.md §5: mean of local means 5.3333


@dataclass
class Site:
    name: str
    username: str
    password: str
    url: str  # its controller
    data_dir: Path
    api: FeatureCloudAPI
    process: subprocess.Popen

    def controller(self, method: str, path: str, **kw) -> httpx.Response:
        return httpx.request(method, self.url + path, timeout=60, **kw)


@dataclass
class Localfc:
    hub_url: str
    sites: list[Site]

    @property
    def coordinator(self) -> Site:
        return self.sites[0]


def _start(argv: list[str], env: dict, log: Path) -> subprocess.Popen:
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONUNBUFFERED": "1",
            "FEDSIM_EXTRA_APPS": str(TEST_APPS)}
    return subprocess.Popen(argv, cwd=REPO, env={**base, **env}, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def _up(url: str, process: subprocess.Popen, log: Path) -> bool:
    if process.poll() is not None:
        raise AssertionError(f"{url} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def localfc(tmp_path_factory):
    root = tmp_path_factory.mktemp("localfc")
    hub_url = f"http://127.0.0.1:{free_port()}"
    hub = _start([sys.executable, "-m", "fedsim_runner", "hub", "--port", hub_url.rsplit(":", 1)[1],
                  "--db", str(root / "hub.sqlite3")], {}, root / "hub.log")
    processes = [hub]
    try:
        assert wait_until(lambda: _up(hub_url + "/api/apps/", hub, root / "hub.log"), 60), "hub did not come up"
        sites = []
        for name in ["alpha", "beta", "gamma"]:
            username, password = f"{name}@example.org", f"pw-{name}-{os.urandom(4).hex()}"
            api = FeatureCloudAPI(hub_url)
            api.signup(username, password, first_name=name, last_name="site")
            api.login(username, password)
            url = f"http://127.0.0.1:{free_port()}"
            log = root / f"controller-{name}.log"
            proc = _start([sys.executable, "-m", "fedsim_runner", "controller", "--site", name, "--hub", hub_url,
                           "--port", url.rsplit(":", 1)[1], "--data-dir", str(root / name), "--timing", "fast"],
                          {"FC_USERNAME": username, "FC_PASSWORD": password}, log)
            processes.append(proc)
            sites.append(Site(name, username, password, url, root / name, api, proc))
        for site in sites:
            assert wait_until(lambda s=site: _up(s.url + "/ping/", s.process, root / f"controller-{s.name}.log"), 60)
            assert (site.data_dir / "site_info.json").is_file()
        yield Localfc(hub_url, sites)
    finally:
        for proc in reversed(processes):
            _stop(proc)


def _create_project(lf: Localfc, slug: str) -> int:
    """Coordinator: app in its library, project with that workflow, one token per participant; all join; prepare."""
    coord = lf.coordinator.api
    app_id = next(a["id"] for a in coord.apps() if a["slug"] == slug)
    coord.purchase_app(app_id)
    pid = coord.create_project(f"e2e {slug}", "localfc end-to-end test")["id"]
    coord.set_workflow(pid, [app_id])
    for site in lf.sites[1:]:
        site.api.join_project(coord.create_token(pid)["token"])
    coord.set_project_status(pid, "prepare")
    return pid


def _contribute(site: Site, pid: int, files: dict[str, bytes], finalize: bool = True) -> None:
    for name, content in files.items():
        r = site.controller("POST", "/file-upload/", params={"projectId": pid, "fileName": name, "finalize": "false",
                                                             "consent": "true"}, content=content)
        assert r.status_code == 200, r.text
    if finalize:
        r = site.controller("POST", "/file-upload/", params={"projectId": pid, "fileName": "", "finalize": "true",
                                                             "consent": "true"}, content=b"")
        assert r.status_code == 200, r.text


def _final_status(lf: Localfc, pid: int) -> str:
    final = wait_until(lambda: (s := lf.coordinator.api.project(pid)["status"]) in ("finished", "error", "failed",
                                                                                    "stopped") and s, RUN_TIMEOUT)
    assert final, f"project {pid} did not end within {RUN_TIMEOUT} s"
    return final


def _latest_run(site: Site, pid: int, with_result: bool = True) -> dict:
    def probe():
        runs = site.controller("GET", "/project-runs/", params={"projectId": pid}).json()
        return runs and (runs[0]["resultSteps"] or not with_result) and runs[0]["logSteps"] and runs[0]
    run = wait_until(probe, 60)
    assert run, f"{site.name}: no finished run of project {pid} on its controller"
    return run


def _results(lf: Localfc, pid: int, tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Each site downloads its result zip and log of step 1 from its own controller: {site: (folder, log)}."""
    out = {}
    for site in lf.sites:
        run = _latest_run(site, pid)
        params = {"projectId": pid, "step": 1, "run": run["runNr"]}
        z = site.controller("GET", "/file-download/", params=params)
        assert z.status_code == 200 and z.headers["content-type"] == "application/zip"
        folder = tmp_path / site.name
        zipfile.ZipFile(io.BytesIO(z.content)).extractall(folder)
        log = site.controller("GET", "/logs-download/", params=params)
        assert log.status_code == 200 and log.text
        out[site.name] = (folder, log.text)
        on_disk = site.data_dir / "workflows" / f"Project_{pid}" / f"Run_{run['runNr']}"
        assert (on_disk / f"results_pr{pid}_run{run['runNr']}_step1.zip").is_file()
    return out


@needs_app("mean-app")
def test_mean_app_three_sites(localfc, tmp_path):
    pid = _create_project(localfc, "mean-app")
    config = yaml.safe_dump({"fc_mean": {"input_name": "data.csv", "output_name": "output.csv"}}).encode()
    for site, numbers in zip(localfc.sites, MEAN_EXAMPLE, strict=True):
        _contribute(site, pid, {"data.csv": ",".join(map(str, numbers)).encode(), "config.yml": config})
    assert _final_status(localfc, pid) == "finished"
    results = _results(localfc, pid, tmp_path)
    for folder, _log in results.values():
        assert mean.read_result(folder)["mean"] == pytest.approx(16 / 3, abs=1e-4)
    logs = localfc.coordinator.controller("GET", "/logs/", params={"from": 0}).json()
    assert any(f"project {pid} run" in e["message"] and "finished" in e["message"] for e in logs)


def _low_rank(n_samples: int, n_features: int, seed: int) -> np.ndarray:
    """Samples × features with well separated leading singular values, so both SVD paths converge tightly."""
    rng = np.random.default_rng(seed)
    scales = np.array([40.0, 30.0, 22.0, 16.0, 11.0])
    latent = rng.standard_normal((n_samples, 5)) * scales
    return latent @ rng.standard_normal((5, n_features)) + 0.5 * rng.standard_normal((n_samples, n_features))


@needs_app("federated-svd")
@pytest.mark.parametrize("n_features", [30, 160], ids=["covariance-path", "iterative-path"])
def test_federated_svd_matches_numpy(localfc, tmp_path, n_features):
    k, n_samples = 5, 150
    X = _low_rank(n_samples, n_features, seed=n_features)
    data = Dataset("e2e", X, [f"s{i}" for i in range(n_samples)], [f"f{j}" for j in range(n_features)])
    split = dict(zip([s.name for s in localfc.sites], np.array_split(np.arange(n_samples), 3), strict=True))
    params = {**svd.DEFAULTS, "k": k}
    config = yaml.safe_dump(svd.app_config(params)).encode()
    pid = _create_project(localfc, "federated-svd")
    for site in localfc.sites:
        _contribute(site, pid, {svd.INPUT_FILE: svd.site_table(data, split[site.name]), "config.yml": config})
    assert _final_status(localfc, pid) == "finished"
    scaled = X - X.mean(axis=0)
    scaled /= scaled.std(axis=0, ddof=1)
    reference = np.linalg.svd(scaled, full_matrices=False)[2][:k].T  # features × k: the app's left vectors
    for name, (folder, _log) in _results(localfc, pid, tmp_path).items():
        result = svd.read_result(folder)
        assert result["features"] == data.feature_names
        left = result["left"][:, :k]
        angle = float(np.max(subspace_angles(left, reference)))
        assert angle < 1e-6, f"{name}: subspace angle {angle:.2e} rad to numpy's SVD ({n_features} features)"


def test_failing_app_ends_in_error_everywhere_with_traceback(localfc):
    pid = _create_project(localfc, "failing-app")
    for site in localfc.sites:
        _contribute(site, pid, {"config.yml": b"failing_app: {}\n"})
    assert _final_status(localfc, pid) == "error"
    raised = []
    for site in localfc.sites:
        run = _latest_run(site, pid, with_result=False)
        log = site.controller("GET", "/logs-download/",
                              params={"projectId": pid, "step": 1, "run": run["runNr"]}).text
        assert "run ended in error" in log, f"{site.name}: the run did not end in error:\n{log[-2000:]}"
        if "Traceback" in log:
            assert "DeliberateFailure" in log and site is not localfc.coordinator
            raised.append(site.name)
    # the failing app's traceback is in its site's log; a participant whose app the first error stopped before it
    # raised (a loaded machine) and the coordinator only say why they were stopped
    assert raised


def test_site_that_never_finalises_leaves_prepare_and_shutdown_stops(localfc):
    pid = _create_project(localfc, "mean-app")
    config = yaml.safe_dump({"fc_mean": {"input_name": "data.csv", "output_name": "output.csv"}}).encode()
    for site, numbers in zip(localfc.sites, MEAN_EXAMPLE, strict=True):
        _contribute(site, pid, {"data.csv": ",".join(map(str, numbers)).encode(), "config.yml": config},
                    finalize=site is not localfc.sites[-1])
    # both finalisations are recorded by the hub before the status answer below
    members = localfc.coordinator.api.run_info(pid)["members"]
    assert sorted(m["finalized"] for m in members) == [False, True, True]
    assert localfc.coordinator.api.project(pid)["status"] == "prepare"
    localfc.coordinator.api.set_project_status(pid, "shutdown")
    assert localfc.coordinator.api.project(pid)["status"] == "stopped"
    for site in localfc.sites:
        assert site.controller("GET", "/project-runs/", params={"projectId": pid}).json() == []
    late = localfc.sites[-1].controller("POST", "/file-upload/", params={"projectId": pid, "fileName": "x.csv",
                                                                         "finalize": "false"}, content=b"1")
    assert late.status_code == 409 and "prepare" in late.json()["detail"]


@needs_app("mean-app")
def test_testbed_runs_mean_app_through_the_featurecloud_cli(localfc):
    site = localfc.coordinator
    for i, numbers in enumerate(MEAN_EXAMPLE):
        client = site.data_dir / "testbed" / f"c{i}"
        client.mkdir(parents=True)
        (client / "data.csv").write_text(",".join(map(str, numbers)))
    generic = site.data_dir / "testbed" / "generic"
    generic.mkdir()
    (generic / "config.yml").write_text(yaml.safe_dump({"fc_mean": {"input_name": "data.csv",
                                                                     "output_name": "output.csv"}}))
    cli = subprocess.run([str(FEATURECLOUD_CLI), "test", "start", "--controller-host", site.url,
                          "--client-dirs", "testbed/c0,testbed/c1,testbed/c2", "--generic-dir", "testbed/generic",
                          "--app-image", "featurecloud.ai/mean-app:latest", "--query-interval", "1",
                          "--download-results", "out"], capture_output=True, text=True, timeout=120)
    match = re.search(r"Test id=(\d+) started", cli.stdout)
    assert match, cli.stdout + cli.stderr
    test_id = match.group(1)
    info = wait_until(lambda: (i := site.controller("GET", f"/app/test/{test_id}/").json())["status"]
                      in ("finished", "error", "stopped") and i, RUN_TIMEOUT)
    assert info and info["status"] == "finished", info
    assert len(info["instances"]) == 3
    zips = sorted((site.data_dir / "tests" / "out").glob("*.zip"))
    assert [re.search(r"client_(\d+)", z.name).group(1) for z in zips] == ["0", "1", "2"]
    for z in zips:
        with zipfile.ZipFile(z) as archive:
            assert float(archive.read("output.csv").decode().replace(",", " ").split()[-1]) == pytest.approx(
                16 / 3, abs=1e-4)
    traffic = site.controller("GET", f"/app/test/{test_id}/traffic/").json()
    assert traffic, "the test's relay recorded no traffic"
    logs = subprocess.run([str(FEATURECLOUD_CLI), "test", "logs", "--controller-host", site.url, "--test-id",
                           test_id, "--instance-id", "0", "--from-row", "0"], capture_output=True, text=True,
                          timeout=60)
    assert logs.returncode == 0 and "terminal" in logs.stdout, logs.stdout + logs.stderr
