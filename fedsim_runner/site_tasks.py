"""What a participant does, as plain functions the orchestrator runs on the participant's own site (Dask worker).

Each function reads the site's credentials with `os.getenv` (the site worker loaded the site's own dotfile, DESIGN §10)
and returns only JSON-able, non-secret values: ids, statuses, project tokens (they admit to one project, they are not
account secrets), file names and bytes. They drive the website through the `api` driver and the site's OWN controller
through the controller client, so the same code runs against localfc and featurecloud.ai.
"""

from __future__ import annotations

import getpass
import os
import socket
import threading
import time
from pathlib import Path

from fedsim_runner.backoff import delays, wait_until
from fedsim_runner.errors import RunFailed
from fedsim_runner.featurecloud.api import FeatureCloudClient, FeatureCloudError
from fedsim_runner.featurecloud.controller_client import ControllerClient

FINAL_STATUSES = ("finished", "error", "failed", "stopped")
SETTABLE_STATUSES = ("ready", "prepare", "shutdown")

_clients: dict[tuple[str, str], FeatureCloudClient] = {}
_clients_lock = threading.Lock()


def _site() -> str:
    return os.getenv("FEDSIM_SITE") or socket.gethostname()


def _env(name: str) -> str:
    value = os.getenv(name)
    if not value:
        raise RunFailed(f"site {_site()}: {name} is not set; run distribute.yml for this site (~/.fedsim/site.env)")
    return value


def _platform() -> FeatureCloudClient:
    """This site's logged-in website client, one per worker process (tasks of a site share its session)."""
    key = (_env("FC_BASE_URL"), _env("FC_USERNAME"))
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = FeatureCloudClient(key[0])
            client.login(key[1], _env("FC_PASSWORD"))
            _clients[key] = client
        return client


def _controller() -> ControllerClient:
    return ControllerClient(_env("FC_CONTROLLER_URL"))


def site_identity() -> dict:
    """Who and where this task runs: the site's name from its dotfile, unix user, hostname, PID and home."""
    return {
        "site": os.getenv("FEDSIM_SITE"),
        "user": getpass.getuser(),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "home": os.path.expanduser("~"),
    }


def login() -> dict:
    """Log in with the site's own account; {site, user}."""
    _platform()
    return {"site": _site(), "user": _env("FC_USERNAME")}


def ensure_account(signup: bool = False) -> dict:
    """Log in with the site's own account; with `signup` (localfc, whose accounts are FedSim's own) the site first
    creates its account on the hub when it does not exist yet. {site, user}."""
    if signup:
        with FeatureCloudClient(_env("FC_BASE_URL")) as client:
            try:
                client.signup(_env("FC_USERNAME"), _env("FC_PASSWORD"), _site(), "site")
            except FeatureCloudError as e:
                if e.status != 409:  # 409: the account exists (an earlier run on the same hub)
                    raise
    return login()


def ensure_app(app_slug: str) -> int:
    """The app's id, after adding it to this account's library when it is not there yet."""
    client = _platform()
    app_id = int(client.app_by_slug(app_slug)["id"])
    if app_id not in {int(a["id"]) for a in client.library()}:
        client.purchase_app(app_id)
    return app_id


def create_project(name: str, app_slug: str, description: str = "created by FedSim") -> int:
    """Coordinator: a new project whose workflow is the one app, in status `ready`; its id."""
    app_id = ensure_app(app_slug)
    client = _platform()
    project_id = int(client.create_project(name, description)["id"])
    client.set_workflow(project_id, [app_id])
    return project_id


def create_tokens(project_id: int, n: int) -> list[str]:
    """Coordinator: one join token per participant."""
    client = _platform()
    return [client.create_token(project_id)["token"] for _ in range(n)]


def join(token: str) -> int:
    """Participant: join the project the token belongs to; the project's id."""
    return int(_platform().join_project(token)["id"])


def set_status(project_id: int, status: str) -> str:
    """Coordinator: `ready`, `prepare` (uploads open) or `shutdown`; the project's status afterwards."""
    if status not in SETTABLE_STATUSES:
        raise ValueError(f"status must be one of {', '.join(SETTABLE_STATUSES)}, not {status!r}")
    return _platform().set_project_status(project_id, status)["status"]


def project_status(project_id: int) -> str:
    return _platform().project(project_id)["status"]


def upload_and_finalise(project_id: int, files: str | list[str], controller_timeout: float = 60.0) -> dict:
    """Upload the site's input files to its OWN controller, then finalise; {files: [names], bytes: total}.

    `files` is a folder (every file in it, sub-folders kept as relative names) or a list of files, relative paths
    resolved against the site's home.
    """
    paths = _input_files(files)
    with _controller() as controller:
        if not wait_until(controller.ping, controller_timeout, first=0.05):
            raise RunFailed(
                f"site {_site()}: its controller at {_env('FC_CONTROLLER_URL')} did not answer within "
                f"{controller_timeout:.0f} s; start it (services.yml) and check its log"
            )
        total = 0
        for name, path in paths:
            data = path.read_bytes()
            controller.upload(project_id, name, data)
            total += len(data)
        controller.finalize(project_id)
    return {"files": [name for name, _ in paths], "bytes": total}


def _input_files(files: str | list[str]) -> list[tuple[str, Path]]:
    def resolve(p: str) -> Path:
        return Path(p).expanduser() if Path(p).expanduser().is_absolute() else Path.home() / p

    if isinstance(files, str):
        folder = resolve(files)
        if not folder.is_dir():
            raise RunFailed(f"site {_site()}: input folder {folder} does not exist; run distribute.yml for this site")
        found = [(p.relative_to(folder).as_posix(), p) for p in sorted(folder.rglob("*")) if p.is_file()]
    else:
        found = [(resolve(p).name, resolve(p)) for p in files]
        missing = [str(p) for _, p in found if not p.is_file()]
        if missing:
            raise RunFailed(f"site {_site()}: input file(s) {', '.join(missing)} missing; run distribute.yml")
    if not found:
        raise RunFailed(f"site {_site()}: no input files in {files}; run distribute.yml for this site")
    return found


def wait_for_final_status(project_id: int, timeout: float, poll_cap: float = 2.0) -> str:
    """Coordinator: poll the project (backoff up to `poll_cap` s) until finished/error/failed/stopped; that status.

    After `timeout` seconds the project is shut down and the task fails naming the site and the last status seen.
    """
    client = _platform()
    deadline = time.monotonic() + timeout
    pauses = delays(0.05, cap=poll_cap)
    while True:
        status = client.project(project_id)["status"]
        if status in FINAL_STATUSES:
            return status
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            try:
                client.set_project_status(project_id, "shutdown")
                done = "FedSim shut it down"
            except FeatureCloudError as e:  # the timeout is the news; a refused shutdown must not hide it
                done = f"shutting it down failed too ({e})"
            raise RunFailed(
                f"site {_site()}: project {project_id} still {status!r} after {timeout:.0f} s; {done} "
                "(raise project.timeout if the app needs longer)"
            )
        time.sleep(min(next(pauses), remaining))


def download_results(project_id: int, timeout: float = 60.0, expect_results: bool = True) -> dict[str, bytes]:
    """The newest run's result zips and step logs from the site's OWN controller: {file name: bytes}.

    With `expect_results` it waits (backoff, `timeout`) until the controller has written the result zip, since a
    participant's app may finish after the coordinator's; without it (a failed run) it takes what is there.
    """
    with _controller() as controller:

        def newest_run() -> dict | None:
            runs = controller.project_runs(project_id)
            run = runs[0] if runs else None
            if run and (run["resultSteps"] or not expect_results):
                return run
            return None

        run = wait_until(newest_run, timeout, first=0.05, cap=2.0)
        if run is None:
            if expect_results:
                raise RunFailed(
                    f"site {_site()}: its controller has no result for project {project_id} after {timeout:.0f} s; "
                    "see the site's controller log"
                )
            return {}
        nr = int(run["runNr"])
        out: dict[str, bytes] = {}
        for step in run["resultSteps"]:
            out[f"results_pr{project_id}_run{nr}_step{step}.zip"] = controller.download_result(project_id, step, nr)
        for step in run["logSteps"]:
            out[f"logs_pr{project_id}_run{nr}_step{step}.txt"] = controller.download_log(project_id, step, nr)
    return out
