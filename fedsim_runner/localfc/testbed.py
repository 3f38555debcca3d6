"""The controller's testbed (POST /app/test/ …): N clients of one app on ONE controller, as FeatureCloud's own.

Client dirs and the generic dir are relative to the controller's data dir; every instance gets its client dir plus the
generic dir as input. Data moves through an in-process relay with the hub relay's routing rules, driven by the same
protocol driver as project runs. Results: one zip per client under <data-dir>/tests/<downloadResults>/ (when downloadResults is given).
"""

from __future__ import annotations

import itertools
import json
import queue
import secrets
import shutil
import threading
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from fedsim_runner.errors import ConfigError, RunFailed
from fedsim_runner.localfc import app_folder
from fedsim_runner.localfc.hub import element_sum
from fedsim_runner.localfc.project_runner import AppFailed, Message, drive, zip_folder
from fedsim_runner.localfc.runtime import start_instance
from fedsim_runner.localfc.timing import Timing


class TestbedError(Exception):
    """A request the testbed refuses; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def image_slug(docker_image: str) -> str:
    """'featurecloud.ai/mean-app:latest' or 'mean-app' → 'mean-app'."""
    name = docker_image.strip().rsplit("/", 1)[-1]
    return name.split("@", 1)[0].split(":", 1)[0]


def _now() -> str:
    return datetime.now(UTC).isoformat()


class LocalRelay:
    """The testbed's relay: one inbox per client, the hub's routing and SMPC rules, and a traffic record."""

    def __init__(self, clients: list[str], coordinator_id: str) -> None:
        self.clients, self.coordinator_id = clients, coordinator_id
        self.inboxes: dict[str, queue.Queue[Message]] = {c: queue.Queue() for c in clients}
        self._smpc: dict[str | None, dict[str, bytes]] = {}
        self._traffic: list[dict] = []
        self._lock = threading.Lock()

    def endpoint(self, client: str) -> RelayEndpoint:
        return RelayEndpoint(self, client)

    def send(self, sender: str, destination: str, memo: str | None, smpc: bool, payload: bytes) -> None:
        with self._lock:
            self._traffic.append({"time": _now(), "sender": sender, "destination": destination, "memo": memo,
                                  "smpc": smpc, "bytes": len(payload)})
            if smpc:
                shares = self._smpc.setdefault(memo, {})
                shares[sender] = payload
                if set(shares) != set(self.clients):
                    return
                total = json.loads(shares.pop(self.clients[0]))
                for share in shares.values():
                    total = element_sum(total, json.loads(share))
                del self._smpc[memo]
                sender, recipients, payload = self.coordinator_id, [self.coordinator_id], json.dumps(total).encode()
            elif destination == "all":
                recipients = [c for c in self.clients if c != sender]
            elif destination == "coordinator":
                recipients = [self.coordinator_id]
            elif destination in self.inboxes:
                recipients = [destination]
            else:
                raise RunFailed(f"client {sender} sent to {destination!r}, which is not a client of this test")
        for recipient in recipients:
            self.inboxes[recipient].put(Message(payload, sender, memo))

    def traffic(self) -> list[dict]:
        with self._lock:
            return list(self._traffic)


class RelayEndpoint:
    """One client's side of the local relay (the Relay interface of project_runner.drive)."""

    def __init__(self, relay: LocalRelay, client: str) -> None:
        self.relay, self.client = relay, client

    def send(self, sender: str, destination: str, memo: str | None, smpc: bool, payload: bytes) -> None:
        self.relay.send(sender, destination, memo, smpc, payload)

    def receive(self, timeout: float) -> Message | None:
        try:
            return self.relay.inboxes[self.client].get(timeout=timeout)
        except queue.Empty:
            return None


class TestRun:
    """One test: its instances (one thread each), relay, status and results."""

    def __init__(self, test_id: int, body: dict, data_dir: Path, timing: Timing, log: Callable[..., None]) -> None:
        self.id, self.data_dir, self.timing, self.log = test_id, data_dir, timing, log
        self.image = str(body.get("dockerImage") or "")
        slug = image_slug(self.image)
        try:
            self.app = app_folder(slug)
        except (ConfigError, KeyError, FileNotFoundError) as e:
            raise TestbedError(f"dockerImage {self.image!r}: no app folder for {slug!r} ({e})", 404) from e
        dirs = [str(d) for d in body.get("directories") or []]
        if not dirs:
            raise TestbedError("directories: give at least one client directory")
        self.client_dirs = [self._data_path(d, "directories") for d in dirs]
        generic = str(body.get("genericDirectory") or "")
        self.generic = self._data_path(generic, "genericDirectory") if generic else None
        asked = float(body.get("queryInterval") or timing.query_interval)
        # the test's own query interval, as FeatureCloud does; `fast` timing shortens it
        self.query_interval = min(asked, timing.query_interval) if timing.name == "fast" else asked
        self.download = str(body.get("downloadResults") or "")
        self.folder = data_dir / "tests" / f"test_{test_id}"
        self.status = "running"
        self.created = _now()
        self.finished_at: str | None = None
        self.client_ids = [secrets.token_hex(8) for _ in self.client_dirs]
        self.relay = LocalRelay(self.client_ids, coordinator_id=self.client_ids[0])
        self.instance_status = ["running"] * len(self.client_ids)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True, name=f"test-{test_id}-{i}")
                         for i in range(len(self.client_ids))]

    def _data_path(self, rel: str, field: str) -> Path:
        path = (self.data_dir / rel).resolve()
        if self.data_dir not in (path, *path.parents):
            raise TestbedError(f"{field}: {rel!r} is outside the controller's data dir {self.data_dir}")
        if not path.is_dir():
            raise TestbedError(f"{field}: {rel!r} is not a folder under the controller's data dir {self.data_dir}")
        return path

    def start(self) -> None:
        for t in self._threads:
            t.start()
        threading.Thread(target=self._finish, daemon=True, name=f"test-{self.id}").start()

    def _input(self, i: int) -> Path:
        target = self.folder / f"client_{i}" / "input"
        shutil.copytree(self.client_dirs[i], target, dirs_exist_ok=True)
        if self.generic:
            shutil.copytree(self.generic, target, dirs_exist_ok=True)
        return target

    def _client(self, i: int) -> None:
        output = self.folder / f"client_{i}" / "output"
        output.mkdir(parents=True, exist_ok=True)
        try:
            instance = start_instance(self.app, self._input(i), output, self.log_file(i), self.timing.engine_waits)
            try:
                drive(instance, client_id=self.client_ids[i], coordinator_id=self.client_ids[0],
                      clients=self.client_ids, relay=self.relay.endpoint(self.client_ids[i]),
                      query_interval=self.query_interval, first_poll=min(self.timing.first_poll, self.query_interval),
                      cancelled=lambda: "the test was stopped" if self._stop.is_set() else None)
            finally:
                instance.stop()
            self.instance_status[i] = "finished"
        except (AppFailed, RunFailed) as e:
            self._fail(i, str(e))
        except Exception as e:  # a bug here must still end the test, with the trace in the instance log
            self._fail(i, f"controller error: {e}\n{traceback.format_exc()}")

    def _fail(self, i: int, message: str) -> None:
        self.instance_status[i] = "stopped" if self._stop.is_set() else "error"
        with self.log_file(i).open("a") as f:
            f.write(f"\n[localfc testbed] client {i} ended: {message}\n")
        self.log(f"test {self.id} client {i}: {message}", "error")
        self._stop.set()  # one failing client fails the test: stop the others

    def _finish(self) -> None:
        for t in self._threads:
            t.join()
        failed = any(s == "error" for s in self.instance_status)
        if not failed and self.download and not self._stop.is_set():
            self.status = "writing"
            target = self.data_dir / "tests" / self.download
            target.mkdir(parents=True, exist_ok=True)
            for i in range(len(self.client_ids)):
                zip_folder(self.folder / f"client_{i}" / "output",
                           target / f"results_test_{self.id}_client_{i}.zip")
        self.status = "error" if failed else ("stopped" if self._stop.is_set() else "finished")
        self.finished_at = _now()
        self.log(f"test {self.id} ({self.image}, {len(self.client_ids)} clients): {self.status}")

    def log_file(self, i: int) -> Path:
        return self.folder / f"client_{i}" / "app.log"

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def info(self) -> dict:
        return {"id": self.id, "status": self.status, "createdAt": self.created, "finishedAt": self.finished_at,
                "dockerImage": self.image,
                "instances": [{"id": i, "name": f"client_{i}", "clientId": cid, "coordinator": i == 0,
                               "status": self.instance_status[i]} for i, cid in enumerate(self.client_ids)]}

    def logs(self, i: int, start: int) -> list[str]:
        if not 0 <= i < len(self.client_ids):
            raise TestbedError(f"test {self.id} has no instance {i}", 404)
        path = self.log_file(i)
        lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
        return lines[max(start, 0):]


class Testbed:
    def __init__(self, data_dir: Path, timing: Timing, log: Callable[..., None]) -> None:
        self.data_dir, self.timing, self.log = data_dir, timing, log
        self.tests: dict[int, TestRun] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def start(self, body: dict) -> int:
        with self._lock:
            test = TestRun(next(self._ids), body, self.data_dir, self.timing, self.log)
            self.tests[test.id] = test
        self.log(f"test {test.id}: starting {len(test.client_ids)} clients of {test.image}")
        test.start()
        return test.id

    def _get(self, test_id: int) -> TestRun:
        if test_id not in self.tests:
            raise TestbedError(f"test {test_id} does not exist; GET /app/tests/ lists the tests", 404)
        return self.tests[test_id]

    def list(self) -> list[dict]:
        return [t.info() for t in self.tests.values()]

    def info(self, test_id: int) -> dict:
        return self._get(test_id).info()

    def traffic(self, test_id: int) -> list[dict]:
        return self._get(test_id).relay.traffic()

    def logs(self, test_id: int, instance: int, start: int) -> list[str]:
        return self._get(test_id).logs(instance, start)

    def stop(self, test_id: int, delete: bool) -> None:
        test = self._get(test_id)
        test.stop()
        if delete:
            shutil.rmtree(test.folder, ignore_errors=True)
            del self.tests[test_id]

    def delete_all(self) -> None:
        for test_id in list(self.tests):
            self.stop(test_id, delete=True)

    def stop_all(self) -> None:
        for test in list(self.tests.values()):
            test.stop()
