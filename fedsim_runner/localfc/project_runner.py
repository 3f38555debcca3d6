"""One project run at one site: the site's app instance for each workflow step, its data through the hub's relay.

Per step: start the app through the runtime with the step's input (the site's uploads for step 1, the previous step's
output after that), drive it with the app protocol (protocol.drive: setup, status/data in pairs, routing), zip its
output to results_pr<pid>_run<n>_step<k>.zip, keep its log as logs_pr<pid>_run<n>_step<k>.txt, and report the outcome
to the hub. A run ends in `error` when the app fails, its process dies, or the controller is told to stop it.
`drive` speaks the app protocol (FEATURECLOUD.md §4) over any relay; the testbed uses it with an in-process relay.
"""

from __future__ import annotations

import json
import queue
import shutil
import threading
import time
import traceback
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import httpx

from fedsim_runner.backoff import delays
from fedsim_runner.errors import RunFailed
from fedsim_runner.localfc import app_folder
from fedsim_runner.localfc.hub_link import HubLink
from fedsim_runner.localfc.runtime import start_instance
from fedsim_runner.localfc.timing import Timing


class AppFailed(Exception):
    """The app instance failed, died, or was stopped: the message says which."""


@dataclass
class Message:
    body: bytes
    sender: str
    memo: str | None


class Relay(Protocol):
    """Where an instance's outgoing data goes and its incoming data comes from (hub relay or in-process)."""

    def send(self, sender: str, destination: str, memo: str | None, smpc: bool, payload: bytes) -> None: ...

    def receive(self, timeout: float) -> Message | None: ...


def parse_status(body: bytes) -> dict:
    """A GET /status body: JSON, or (queue non-empty) a JSON string holding JSON, whatever the content type says."""
    value = json.loads(body)
    while isinstance(value, str):
        value = json.loads(value)
    return value


def route(status: dict, client_id: str, coordinator_id: str) -> str:
    """The relay destination of an outgoing payload: 'coordinator', 'all' or a client id (FEATURECLOUD.md §4)."""
    if status.get("smpc"):
        return "coordinator"  # every client's share is summed by the relay and delivered once to the coordinator
    destination = status.get("destination")
    if destination is None:
        return "all" if client_id == coordinator_id else "coordinator"
    return str(destination)


def drive(instance, *, client_id: str, coordinator_id: str, clients: list[str], relay: Relay,
          query_interval: float, first_poll: float, cancelled: Callable[[], str | None]) -> None:
    """Run one app instance to its end: /setup, then GET /status and GET /data strictly in pairs, incoming data by
    POST /data. Returns when the instance reports `finished`; AppFailed on error, death or cancellation.

    Idle waits are waits for incoming data (relay.receive), growing from `first_poll` to `query_interval`.
    """
    coordinator = client_id == coordinator_id
    with httpx.Client(base_url=instance.url, timeout=httpx.Timeout(120.0, connect=10.0)) as app:
        app.post("/setup", json={"id": client_id, "coordinator": coordinator, "master": coordinator,
                                 "clients": clients, "coordinatorID": coordinator_id}).raise_for_status()
        pauses = delays(min(first_poll, query_interval), cap=query_interval)
        while True:
            if reason := cancelled():
                raise AppFailed(f"stopped: {reason}")
            if not instance.alive():
                raise AppFailed("the app process exited before the app finished; see the app log")
            status = parse_status(app.get("/status").content)
            if status.get("state") == "error":
                raise AppFailed(f"the app failed ({status.get('message')}); the traceback is in the app log")
            if status.get("available"):
                payload = app.get("/data").content  # the GET /data that belongs to the GET /status above
                relay.send(client_id, route(status, client_id, coordinator_id), status.get("memo"),
                           bool(status.get("smpc")), payload)
                pauses = delays(min(first_poll, query_interval), cap=query_interval)
                continue
            if status.get("finished"):
                return
            message = relay.receive(timeout=next(pauses))
            if message is not None:
                params = {"client": message.sender}
                if message.memo is not None:
                    params["memo"] = message.memo
                app.post("/data", params=params, content=message.body).raise_for_status()
                pauses = delays(min(first_poll, query_interval), cap=query_interval)


def run_dir(data_dir: Path, pid: int, run_nr: int) -> Path:
    return data_dir / "workflows" / f"Project_{pid}" / f"Run_{run_nr}"


def zip_folder(folder: Path, target: Path) -> None:
    """Zip a step's output (an empty output still gives a valid, empty zip)."""
    tmp = target.with_suffix(".zip.part")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                z.write(path, path.relative_to(folder).as_posix())
    tmp.replace(target)


class HubRelay:
    """The relay of one run as seen by this site: sends go to the hub, a receiver thread long-polls the hub.

    One inbox per run, not per step: a faster site may already send step k+1's data while this one finishes step k.
    """

    def __init__(self, hub: HubLink, pid: int, run_nr: int, client_id: str, timing: Timing) -> None:
        self.hub, self.pid, self.run_nr, self.client_id, self.timing = hub, pid, run_nr, client_id, timing
        self.inbox: queue.Queue[Message] = queue.Queue()
        self.sent_bytes = 0
        self.received_bytes = 0
        self.messages: list[dict] = []  # when each message left or arrived (epoch s): the benchmark's relay latency
        self._stop = threading.Event()
        self._error: str | None = None
        self._thread = threading.Thread(target=self._receive, name=f"relay-{pid}-{run_nr}", daemon=True)
        self._thread.start()

    def send(self, sender: str, destination: str, memo: str | None, smpc: bool, payload: bytes) -> None:
        self.hub.relay_send(self.pid, self.run_nr, sender, destination, memo, smpc, payload)
        self.sent_bytes += len(payload)
        self.messages.append({"sent": time.time(), "to": destination, "memo": memo, "bytes": len(payload)})

    def receive(self, timeout: float) -> Message | None:
        if self._error:
            raise RunFailed(self._error)
        try:
            return self.inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                got = self.hub.relay_receive(self.pid, self.run_nr, self.client_id, self.timing.relay_wait)
            except RunFailed as e:
                if not self._stop.is_set():
                    self._error = f"relay receive failed: {e}"
                return
            if got is not None:
                self.received_bytes += len(got.body)
                self.messages.append({"received": time.time(), "from": got.sender, "memo": got.memo,
                                      "bytes": len(got.body)})
                self.inbox.put(Message(got.body, got.sender, got.memo))

    def close(self) -> None:
        self._stop.set()


class ProjectRun(threading.Thread):
    """The thread that does one run of one project at this site."""

    def __init__(self, pid: int, run: dict, uploads: Path, folder: Path, hub: HubLink, timing: Timing,
                 log: Callable[..., None]) -> None:
        super().__init__(name=f"project-{pid}-run-{run['runNr']}", daemon=True)
        self.pid, self.run_info, self.uploads, self.folder = pid, run, uploads, folder
        self.run_nr = int(run["runNr"])
        self.hub, self.timing, self.log = hub, timing, log
        self.status = "running"
        self.step_times: list[dict] = []
        self._stop_reason: str | None = None
        self._stopped = threading.Event()

    def stop(self, reason: str) -> None:
        if self._stop_reason is None:
            self._stop_reason = reason
        self._stopped.set()

    def _cancelled(self) -> str | None:
        return self._stop_reason if self._stopped.is_set() else None

    def _file(self, kind: str, step: int, suffix: str) -> Path:
        return self.folder / f"{kind}_pr{self.pid}_run{self.run_nr}_step{step}.{suffix}"

    def run(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "run.json").write_text(json.dumps({
            "startedOn": datetime.now(UTC).isoformat(), "clientId": self.run_info["clientId"],
            "coordinatorId": self.run_info["coordinatorId"], "workflow": self.run_info["workflow"]}))
        step_input = self.folder / "input"
        # the uploads belong to this run: a later run of the project gets fresh uploads
        if self.uploads.exists():
            shutil.move(self.uploads, step_input)
        step_input.mkdir(exist_ok=True)
        relay = HubRelay(self.hub, self.pid, self.run_nr, self.run_info["clientId"], self.timing)
        step = 0
        try:
            for step, entry in enumerate(sorted(self.run_info["workflow"], key=lambda w: w["order"]), start=1):
                step_input = self._step(step, entry["slug"], step_input, relay)
            self.status = "finished"
            self.log(f"project {self.pid} run {self.run_nr}: finished ({relay.sent_bytes} bytes sent, "
                     f"{relay.received_bytes} received)")
            self._report("finished", step, "")
        except (AppFailed, RunFailed) as e:
            self._fail(step, str(e))
        except Exception as e:  # a bug here must still end the run in error everywhere, with the trace in the log
            self._fail(step, f"controller error: {e}\n{traceback.format_exc()}")
        finally:
            relay.close()
            (self.folder / "metrics.json").write_text(json.dumps({
                "status": self.status, "clientId": self.run_info["clientId"], "steps": self.step_times,
                "sent_bytes": relay.sent_bytes, "received_bytes": relay.received_bytes, "messages": relay.messages}))

    def _step(self, step: int, slug: str, step_input: Path, relay: HubRelay) -> Path:
        """Run one workflow step; returns its output folder (the next step's input)."""
        output = self.folder / f"step{step}" / "output"
        output.mkdir(parents=True, exist_ok=True)
        config = self.folder / "input" / "config.yml"
        if step > 1 and config.is_file() and not (step_input / "config.yml").exists():
            shutil.copy(config, step_input / "config.yml")  # one config.yml serves the whole workflow
        log_file = self._file("logs", step, "txt")
        run = self.run_info
        started = time.monotonic()
        self.log(f"project {self.pid} run {self.run_nr} step {step}: starting app {slug}")
        instance = start_instance(app_folder(slug), step_input, output, log_file, self.timing.engine_waits)
        try:
            drive(instance, client_id=run["clientId"], coordinator_id=run["coordinatorId"], clients=run["clients"],
                  relay=relay, query_interval=self.timing.query_interval, first_poll=self.timing.first_poll,
                  cancelled=self._cancelled)
        finally:
            instance.stop()
            zip_folder(output, self._file("results", step, "zip"))
        wall = time.monotonic() - started
        self.step_times.append({"step": step, "slug": slug, "wall": wall})
        self.log(f"project {self.pid} run {self.run_nr} step {step}: {slug} finished in {wall:.2f} s")
        return output

    def _fail(self, step: int, message: str) -> None:
        self.status = "error"
        self.log(f"project {self.pid} run {self.run_nr} step {step}: error: {message}", "error")
        log_file = self._file("logs", max(step, 1), "txt")
        with log_file.open("a") as f:
            f.write(f"\n[localfc controller] run ended in error: {message}\n")
        self._report("error", step, message)

    def _report(self, status: str, step: int, message: str) -> None:
        try:
            self.hub.report(self.pid, self.run_nr, status, step, message)
        except RunFailed as e:  # e.g. the project already left `running` because another site failed
            self.log(f"project {self.pid} run {self.run_nr}: report {status} to the hub: {e}", "warn")
