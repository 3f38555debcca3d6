"""Client of a participant's OWN controller (FEATURECLOUD.md §3, http://localhost:8000 by default).

The same calls work against FeatureCloud's Docker controller and the localfc controller. Errors are
`FeatureCloudError`s carrying the controller's status and message.
"""

from __future__ import annotations

import time
from typing import Any

import httpx

from fedsim_runner.featurecloud.api import USER_AGENT, FeatureCloudError, backoff_delay, server_message

CONNECT_RETRIES = 4  # the controller is local: only a refused connection (e.g. still starting) is retried


class ControllerClient:
    def __init__(self, base_url: str = "http://localhost:8000", timeout: float = 120.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, timeout=httpx.Timeout(timeout, connect=5.0),
                                  headers={"User-Agent": USER_AGENT})

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ControllerClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method: str, path: str, **kw) -> httpx.Response:
        for attempt in range(CONNECT_RETRIES + 1):
            try:
                response = self._http.request(method, path, **kw)
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                if attempt == CONNECT_RETRIES:
                    raise FeatureCloudError(None, f"controller {self.base_url} unreachable ({type(e).__name__}); "
                                            "is it running?", method, path) from None
                time.sleep(backoff_delay(attempt))
                continue
            except httpx.TransportError as e:
                raise FeatureCloudError(None, f"controller {self.base_url}: {type(e).__name__}", method,
                                        path) from None
            if response.status_code >= 400:
                raise FeatureCloudError(response.status_code, server_message(response), method, path)
            return response
        raise AssertionError("unreachable")

    def ping(self) -> bool:
        """True when the controller answers GET /ping/ with 200 (no retries: callers wait with backoff)."""
        try:
            return self._http.get("/ping/", timeout=5.0).status_code == 200
        except httpx.TransportError:
            return False

    def upload(self, project_id: int, file_name: str, data: bytes, consent: bool = True) -> Any:
        """One file, its raw bytes as the body (not multipart)."""
        return self._call("POST", "/file-upload/", params={
            "projectId": int(project_id), "fileName": file_name, "finalize": "false",
            "consent": str(consent).lower()}, content=data).json()

    def finalize(self, project_id: int, consent: bool = True) -> Any:
        """This participant has finished uploading (empty body)."""
        return self._call("POST", "/file-upload/", params={
            "projectId": int(project_id), "fileName": "", "finalize": "true", "consent": str(consent).lower()},
            content=b"").json()

    def project_runs(self, project_id: int) -> list[dict]:
        """[{runNr, startedOn, logSteps, resultSteps}], newest first."""
        return self._call("GET", "/project-runs/", params={"projectId": int(project_id)}).json()

    def download_result(self, project_id: int, step: int, run: int) -> bytes:
        """The result zip of one step of one run."""
        return self._call("GET", "/file-download/", params={"projectId": int(project_id), "step": int(step),
                                                            "run": int(run)}).content

    def download_log(self, project_id: int, step: int, run: int) -> bytes:
        return self._call("GET", "/logs-download/", params={"projectId": int(project_id), "step": int(step),
                                                            "run": int(run)}).content

    def logs(self, start: int = 0) -> list[dict]:
        """The controller's log entries from index `start`."""
        return self._call("GET", "/logs/", params={"from": int(start)}).json()
