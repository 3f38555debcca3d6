"""The controller's side of the hub: the site's login, its site record, its projects, runs and the relay.

Only the calls a controller makes (docs/internals.md "localfc hub ↔ controller"); the password stays in this object and
never reaches a log or an exception message.
"""

from __future__ import annotations

import threading

import httpx

from fedsim_runner.backoff import delays
from fedsim_runner.errors import RunFailed

RETRIES = 6


class HubLink:
    def __init__(self, base_url: str, username: str, password: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.username = username
        self._password = password
        self._access: str | None = None
        self._lock = threading.Lock()
        self._http = httpx.Client(base_url=self.base_url, timeout=httpx.Timeout(60.0, connect=10.0),
                                  headers={"User-Agent": "fedsim-localfc-controller"})

    def _login(self) -> None:
        r = self._http.post("/api/auth/login/", json={"username": self.username, "password": self._password})
        if r.status_code != 200:
            raise RunFailed(f"hub {self.base_url}: login of {self.username} refused ({r.status_code}); "
                            "check FC_USERNAME/FC_PASSWORD in the site's dotfile")
        self._access = r.json()["access"]

    def request(self, method: str, path: str, **kw) -> httpx.Response:
        """One hub call as this site's user: logs in on first use and again on 401; retries connection errors."""
        pauses = delays(0.05, cap=2.0)
        for attempt in range(RETRIES):
            try:
                with self._lock:
                    if self._access is None:
                        self._login()
                    token = self._access
                r = self._http.request(method, path, headers={"Authorization": f"Bearer {token}"}, **kw)
                if r.status_code == 401 and attempt == 0:
                    with self._lock:
                        if self._access == token:
                            self._access = None
                    continue
                if r.status_code < 500:
                    return r
            except httpx.TransportError as e:
                if attempt == RETRIES - 1:
                    raise RunFailed(f"hub {self.base_url} unreachable ({type(e).__name__}) during {method} {path}") from None
            threading.Event().wait(next(pauses))
        raise RunFailed(f"hub {self.base_url}: {method} {path} failed with {r.status_code}: {r.text[:200]}")

    def _json(self, method: str, path: str, **kw):
        r = self.request(method, path, **kw)
        if r.status_code >= 400:
            raise RunFailed(f"hub {self.base_url}: {method} {path} answered {r.status_code}: {r.text[:200]}")
        return r.json() if r.content else None

    def register_site(self, name: str) -> dict:
        """The user's site record (created when missing): what <data-dir>/site_info.json holds."""
        r = self.request("GET", "/api/site/")
        if r.status_code == 200 and r.json():
            return r.json()
        return self._json("POST", "/api/site/", json={
            "name": name, "organization": "FedSim", "address": "localfc", "zip": "00000", "city": "localhost",
            "country": "Nowhere", "firstName": name, "lastName": "site", "phone": "0"})

    def heartbeat_and_projects(self) -> list[dict]:
        """Tell the hub this controller is online and return the user's projects."""
        self.request("POST", "/api/localfc/heartbeat/")
        return self._json("GET", "/api/projects/")

    def project_status(self, pid: int) -> str:
        r = self.request("GET", f"/api/projects/{pid}/")
        if r.status_code in (403, 404):
            raise RunFailed(f"project {pid} is unknown to the hub or this site is not a member")
        return r.json()["status"]

    def finalize(self, pid: int) -> dict:
        return self._json("POST", f"/api/localfc/projects/{pid}/finalize/")

    def run_info(self, pid: int) -> dict:
        return self._json("GET", f"/api/localfc/projects/{pid}/run/")

    def report(self, pid: int, run_nr: int, status: str, step: int, message: str = "") -> None:
        self._json("PUT", f"/api/localfc/projects/{pid}/runs/{run_nr}/",
                   json={"status": status, "step": step, "message": message[-2000:]})

    def relay_send(self, pid: int, run_nr: int, sender: str, destination: str, memo: str | None, smpc: bool,
                   payload: bytes) -> None:
        params = {"sender": sender, "destination": destination, "smpc": int(smpc)}
        if memo is not None:
            params["memo"] = memo
        self._json("POST", f"/api/localfc/relay/{pid}/{run_nr}/", params=params, content=payload)

    def relay_receive(self, pid: int, run_nr: int, client: str, wait: float) -> tuple[bytes, str, str | None] | None:
        """The next message for `client` (body, sender, memo), or None when nothing arrived within `wait` s."""
        r = self.request("GET", f"/api/localfc/relay/{pid}/{run_nr}/", params={"client": client, "wait": wait},
                         timeout=wait + 30)
        if r.status_code == 204:
            return None
        if r.status_code != 200:
            raise RunFailed(f"hub relay receive for project {pid} run {run_nr} answered {r.status_code}: {r.text[:200]}")
        return r.content, r.headers["X-FC-Sender"], r.headers.get("X-FC-Memo")
