"""The localfc controller: one per site, serving FeatureCloud's local controller API (FEATURECLOUD.md §3).

It registers the site with the hub, keeps the uploads of each project, starts a project run when the hub says the
project is running (project_runner.py does the run), and serves the testbed endpoints (testbed.py) so that
`featurecloud test start --controller-host …` works against it. Credentials come from FC_USERNAME/FC_PASSWORD.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import uvicorn
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse

from fedsim_runner.errors import ConfigError, RunFailed
from fedsim_runner.localfc.hub_link import HubLink, HubRefused
from fedsim_runner.localfc.project_runner import ProjectRun, run_dir
from fedsim_runner.localfc.testbed import Testbed, TestbedError
from fedsim_runner.localfc.timing import Timing

FINISH_GRACE = 60.0  # s a participant's instance may run on after the coordinator finished the project


class ControllerLog:
    """The controller's own log, served by GET /logs/?from=N and echoed to stderr."""

    def __init__(self) -> None:
        self._entries: list[dict] = []
        self._lock = threading.Lock()

    def __call__(self, message: str, level: str = "info") -> None:
        entry = {"time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "level": level, "message": message}
        with self._lock:
            self._entries.append(entry)
        print(f"{entry['time']} {level:5} {message}", flush=True)

    def since(self, start: int) -> list[dict]:
        with self._lock:
            return self._entries[max(start, 0):]


def safe_relative(name: str) -> Path:
    """An uploaded file's name as a relative path inside the upload folder (no absolute paths, no '..')."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if not name or parts[0] == "/" or any(p in ("..", "") for p in parts):
        raise HTTPException(400, f"fileName {name!r} must be a relative path without '..'")
    return Path(*parts)


class Controller:
    """The site's state: hub link, uploads, project runs (one thread each) and the testbed."""

    def __init__(self, site: str, hub: HubLink, data_dir: Path, timing: Timing) -> None:
        self.site = site
        self.hub = hub
        self.data_dir = data_dir
        self.timing = timing
        self.log = ControllerLog()
        self.runs: dict[tuple[int, int], ProjectRun] = {}
        self.testbed = Testbed(data_dir, timing, self.log)
        self._finished_seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch_hub, name="hub-watch", daemon=True)

    def uploads(self, pid: int) -> Path:
        return self.data_dir / "uploads" / f"Project_{pid}"

    def start(self) -> None:
        info = self.hub.register_site(self.site)
        (self.data_dir / "site_info.json").write_text(json.dumps(info, indent=2))
        self.log(f"site {self.site} registered with the hub {self.hub.base_url} as site id {info.get('id')}")
        self._watcher.start()

    def stop(self) -> None:
        """Controller shutdown: stop watching the hub, then every project instance and test instance."""
        if self._stop.is_set():
            return
        self._stop.set()
        for run in list(self.runs.values()):
            run.stop("the controller was shut down")
        for run in list(self.runs.values()):
            run.join()
        self.testbed.stop_all()
        if self._watcher.is_alive():
            self._watcher.join(timeout=10)
        self.log("controller stopped")

    def _watch_hub(self) -> None:
        """Heartbeat, start runs the hub says are running, stop runs whose project left `running`."""
        while not self._stop.is_set():
            try:
                projects = self.hub.heartbeat_and_projects()
                for project in projects:
                    self._follow(project)
            except RunFailed as e:  # the hub is unreachable or refused: say so and keep trying
                self.log(f"hub: {e}", "warn")
            self._stop.wait(self.timing.hub_poll)

    def _follow(self, project: dict) -> None:
        pid, status = int(project["id"]), project.get("status")
        active = [r for (p, _), r in self.runs.items() if p == pid and r.is_alive()]
        if status == "running" and not active:
            run_nr = project.get("runNr")
            # a run folder on disk: started before a controller restart, its instance is gone; never start it twice
            if run_nr is not None and (pid, int(run_nr)) not in self.runs \
                    and not (run_dir(self.data_dir, pid, int(run_nr)) / "run.json").exists():
                self._start_run(pid, self.hub.run_info(pid))
        elif status != "running":
            for r in active:
                if status in ("error", "failed", "stopped"):
                    r.stop(f"project {pid} is {status} at the hub")
                elif status == "finished":  # the coordinator is done: this site's instance gets a grace period
                    since = self._finished_seen.setdefault(pid, time.monotonic())
                    if time.monotonic() - since > FINISH_GRACE:
                        r.stop(f"project {pid} finished at the hub but this site's app did not end within "
                               f"{FINISH_GRACE:.0f} s")

    def _start_run(self, pid: int, run: dict) -> None:
        run_nr = int(run["runNr"])
        runner = ProjectRun(pid, run, self.uploads(pid), run_dir(self.data_dir, pid, run_nr), self.hub, self.timing,
                            self.log)
        self.runs[(pid, run_nr)] = runner
        self.log(f"project {pid}: starting run {run_nr} ({len(run['clients'])} clients, this site "
                 f"{'coordinator' if run['clientId'] == run['coordinatorId'] else 'participant'})")
        runner.start()


def hub_origins(hub_url: str) -> list[str]:
    """The browser origins of the hub's pages: its URL, also as localhost/127.0.0.1."""
    parts = urlsplit(hub_url)
    port = f":{parts.port}" if parts.port else ""
    hosts = {parts.hostname, *({"localhost", "127.0.0.1"} if parts.hostname in ("localhost", "127.0.0.1") else set())}
    return sorted(f"{parts.scheme}://{host}{port}" for host in hosts)


def project_runs(data_dir: Path, pid: int) -> list[dict]:
    """The runs of a project on disk, newest first, as GET /project-runs/ lists them."""
    root = data_dir / "workflows" / f"Project_{pid}"
    runs = []
    for folder in root.glob("Run_*"):
        if not folder.name[4:].isdigit():
            continue
        nr = int(folder.name[4:])
        meta = folder / "run.json"
        started = json.loads(meta.read_text()).get("startedOn") if meta.is_file() else None
        steps = sorted(int(p.stem.rsplit("step", 1)[1]) for p in folder.glob(f"logs_pr{pid}_run{nr}_step*.txt"))
        results = sorted(int(p.stem.rsplit("step", 1)[1]) for p in folder.glob(f"results_pr{pid}_run{nr}_step*.zip"))
        runs.append({"runNr": nr, "startedOn": started, "logSteps": steps, "resultSteps": results})
    return sorted(runs, key=lambda r: r["runNr"], reverse=True)


def create_app(ctl: Controller) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        # uvicorn re-raises SIGTERM/SIGINT once it has stopped serving: the instances must be gone before that
        await asyncio.to_thread(ctl.stop)

    app = FastAPI(title=f"localfc controller ({ctl.site})", docs_url=None, redoc_url=None, lifespan=lifespan)
    # the hub's project page uploads from the participant's browser straight to this controller (cross-origin)
    app.add_middleware(CORSMiddleware, allow_origins=hub_origins(ctl.hub.base_url), allow_methods=["GET", "POST"],
                       allow_headers=["*"])

    @app.get("/")
    @app.get("/ping/")
    def ping() -> dict:
        return {"site": ctl.site, "status": "online"}

    @app.post("/file-upload/")
    async def file_upload(request: Request, projectId: int, fileName: str = "", finalize: bool = False,
                          consent: str = "") -> dict:
        body = await request.body()
        if body or not finalize:
            target = ctl.uploads(projectId) / safe_relative(fileName)
            status = ctl.hub.project_status(projectId)
            if status != "prepare":
                raise HTTPException(409, f"project {projectId} is {status!r}: uploads are accepted only in 'prepare'")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(body)
            ctl.log(f"project {projectId}: received {fileName} ({len(body)} bytes)")
        if finalize:
            answer = ctl.hub.finalize(projectId)
            ctl.log(f"project {projectId}: upload finalised (consent {consent or 'not given'})")
            return {"projectId": projectId, "finalized": True, "project": answer}
        return {"projectId": projectId, "fileName": fileName, "size": len(body)}

    @app.get("/project-runs/")
    def runs(projectId: int) -> list[dict]:
        return project_runs(ctl.data_dir, projectId)

    def _run_file(pid: int, run: int, name: str) -> Path:
        path = run_dir(ctl.data_dir, pid, run) / name
        if not path.is_file():
            raise HTTPException(404, f"no {name} for project {pid} run {run}: see GET /project-runs/?projectId={pid}")
        return path

    @app.get("/logs-download/")
    def logs_download(projectId: int, step: int, run: int) -> PlainTextResponse:
        path = _run_file(projectId, run, f"logs_pr{projectId}_run{run}_step{step}.txt")
        return PlainTextResponse(path.read_text(errors="replace"))

    @app.get("/file-download/")
    def file_download(projectId: int, step: int, run: int) -> FileResponse:
        name = f"results_pr{projectId}_run{run}_step{step}.zip"
        return FileResponse(_run_file(projectId, run, name), media_type="application/zip", filename=name)

    @app.get("/logs/")
    def logs(start: int = Query(0, alias="from")) -> list[dict]:
        return ctl.log.since(start)

    @app.exception_handler(HubRefused)
    def hub_refused(_: Request, exc: HubRefused) -> JSONResponse:
        status = exc.status if exc.status and 400 <= exc.status < 500 else 502
        return JSONResponse({"detail": str(exc)}, status_code=status)

    @app.exception_handler(TestbedError)
    def testbed_error(_: Request, exc: TestbedError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.post("/app/test/")
    def test_start(body: dict) -> dict:
        return {"id": ctl.testbed.start(body)}

    @app.get("/app/tests/")
    def tests() -> list[dict]:
        return ctl.testbed.list()

    @app.delete("/app/tests/")
    def tests_delete() -> dict:
        ctl.testbed.delete_all()
        return {}

    @app.get("/app/test/{test_id}/")
    def test_info(test_id: int) -> dict:
        return ctl.testbed.info(test_id)

    @app.delete("/app/test/{test_id}/")
    def test_stop(test_id: int, delete: bool = False) -> dict:
        ctl.testbed.stop(test_id, delete=delete)
        return {"id": test_id}

    @app.get("/app/test/{test_id}/traffic/")
    def test_traffic(test_id: int) -> list[dict]:
        return ctl.testbed.traffic(test_id)

    @app.get("/app/test/{test_id}/instance/{instance_id}/logs/")
    def test_logs(test_id: int, instance_id: int, start: int = Query(0, alias="from")) -> dict:
        return {"logs": ctl.testbed.logs(test_id, instance_id, start)}

    return app


def serve(site: str, hub: str, host: str, port: int, data_dir: Path, timing: str) -> None:
    """Run the controller until SIGTERM/SIGINT; then stop every app instance it started."""
    username, password = os.getenv("FC_USERNAME"), os.getenv("FC_PASSWORD")
    if not username or not password:
        raise ConfigError("controller: FC_USERNAME and FC_PASSWORD are not set; load the site's dotfile "
                          "(~/.fedsim/site.env) into the environment first")
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    ctl = Controller(site, HubLink(hub, username, password), data_dir, Timing.named(timing))
    ctl.start()
    server = uvicorn.Server(uvicorn.Config(create_app(ctl), host=host, port=port, log_level="warning",
                                           access_log=False))
    try:
        server.run()  # SIGTERM/SIGINT: graceful exit, the lifespan's end stops every instance
    finally:
        ctl.stop()  # also when the server could not start (e.g. the port is taken)
