"""The controller's session with the hub: the api driver as this site's user, for as long as the controller runs.

A controller outlives any JWT, so it logs in again when the hub refuses its session; every failure becomes a RunFailed
whose message never contains the password.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

from fedsim_runner.errors import RunFailed
from fedsim_runner.featurecloud.api import FeatureCloudClient, FeatureCloudError, RelayMessage

T = TypeVar("T")


class HubRefused(RunFailed):
    """The hub answered with an error; `status` is its HTTP status (None: the hub was not reached)."""

    def __init__(self, message: str, status: int | None) -> None:
        super().__init__(message)
        self.status = status


class HubLink:
    def __init__(self, base_url: str, username: str, password: str) -> None:
        self.client = FeatureCloudClient(base_url)
        self.base_url = self.client.base_url
        self.username = username
        self._password = password
        self._login_lock = threading.Lock()

    def _login(self) -> None:
        with self._login_lock:
            try:
                self.client.login(self.username, self._password)
            except FeatureCloudError as e:
                hint = "; check FC_USERNAME/FC_PASSWORD in the site's dotfile" if e.status in (400, 401) else ""
                raise HubRefused(f"hub {self.base_url}: login of {self.username} failed ({e.message}){hint}",
                                 e.status) from None

    def call(self, what: Callable[[FeatureCloudClient], T]) -> T:
        """One hub call as this site's user (logging in first, and again when the session expired)."""
        if self.client.username is None:
            self._login()
        try:
            return what(self.client)
        except FeatureCloudError as e:
            if e.status != 401:
                raise HubRefused(f"hub {self.base_url}: {e}", e.status) from None
        self._login()
        try:
            return what(self.client)
        except FeatureCloudError as e:
            raise HubRefused(f"hub {self.base_url}: {e}", e.status) from None

    def register_site(self, name: str) -> dict:
        """The user's site record (created when missing): what <data-dir>/site_info.json holds."""
        return self.call(lambda c: c.site() or c.create_site(
            name, organization="FedSim", address="localfc", city="localhost", first_name=name, last_name="site"))

    def heartbeat_and_projects(self) -> list[dict]:
        """Tell the hub this controller is online; the user's projects."""
        self.call(lambda c: c.heartbeat())
        return self.call(lambda c: c.projects())

    def project_status(self, pid: int) -> str:
        return self.call(lambda c: c.project(pid))["status"]

    def finalize(self, pid: int) -> dict:
        return self.call(lambda c: c.finalize(pid))

    def run_info(self, pid: int) -> dict:
        return self.call(lambda c: c.run_info(pid))

    def report(self, pid: int, run_nr: int, status: str, step: int, message: str = "") -> None:
        self.call(lambda c: c.report_run(pid, run_nr, status, step, message[-2000:]))

    def relay_send(self, pid: int, run_nr: int, sender: str, destination: str, memo: str | None, smpc: bool,
                   payload: bytes) -> None:
        self.call(lambda c: c.relay_send(pid, run_nr, sender, destination, payload, memo=memo, smpc=smpc))

    def relay_receive(self, pid: int, run_nr: int, client: str, wait: float) -> RelayMessage | None:
        """The next message for `client`, or None when nothing arrived within `wait` s."""
        return self.call(lambda c: c.relay_receive(pid, run_nr, client, wait))
