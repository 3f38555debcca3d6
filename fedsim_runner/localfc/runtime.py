"""The app runtime: one app instance = one process of the app's own Python environment (DESIGN §5).

Each instance gets a free port and its own input and output folders: bound at /mnt/input and /mnt/output in a private
mount namespace when running as root (so any app in app-template layout runs unchanged), else passed as
FEDSIM_INPUT_DIR / FEDSIM_OUTPUT_DIR (FedSim's apps honour them). Stopping kills the instance's whole process group.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import httpx

from fedsim_runner.backoff import wait_until
from fedsim_runner.config import REPO_ROOT
from fedsim_runner.errors import ConfigError, RunFailed

APP_HOST = Path(__file__).with_name("app_host.py")
START_TIMEOUT = 60.0
MOUNT_POINTS = (Path("/mnt/input"), Path("/mnt/output"))


def apps_python() -> Path:
    python = Path(os.getenv("FEDSIM_APPS_PYTHON") or REPO_ROOT / ".venv-apps" / "bin" / "python")
    if not python.exists():
        raise ConfigError(f"the apps' Python {python} does not exist; run `make venv` or set FEDSIM_APPS_PYTHON")
    return python


# Asks the apps' Python which of the named distributions it lacks (names on argv, missing ones printed as JSON).
_MISSING_PROBE = """import json, sys
from importlib.metadata import PackageNotFoundError, distribution
missing = []
for name in sys.argv[1:]:
    try:
        distribution(name)
    except PackageNotFoundError:
        missing.append(name)
print(json.dumps(missing))
"""
_checked: set[str] = set()  # requirements hashes already found satisfied (checked once per controller process)


def check_requirements(app_dir: Path) -> None:
    """ConfigError naming the packages of the app's requirements.txt that the apps' Python lacks.

    Apps run in the shared apps environment; one that needs more gets a clear error instead of an ImportError at run
    time (the fix: add the packages to apps/requirements.txt, or install them into that environment).
    """
    path = app_dir / "requirements.txt"
    text = path.read_text() if path.exists() else ""
    names = [m.group(0) for line in text.splitlines()
             if (m := re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line.split("#", 1)[0].strip()))]
    key = hashlib.sha256(f"{apps_python()}\n{text}".encode()).hexdigest()
    if not names or key in _checked:
        return
    probe = subprocess.run([str(apps_python()), "-c", _MISSING_PROBE, *names], capture_output=True, text=True,
                           timeout=60)
    missing = json.loads(probe.stdout or "[]") if probe.returncode == 0 else names
    if missing:
        raise ConfigError(f"{path} needs {', '.join(missing)}, missing from the apps' Python {apps_python()}; add "
                          "them to apps/requirements.txt and run `make venv` (or pip install them into that venv)")
    _checked.add(key)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppInstance:
    def __init__(self, process: subprocess.Popen, url: str, log_file: Path) -> None:
        self.process, self.url, self.log_file = process, url, log_file

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """Kill the instance and everything it started (its own process group)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def _answers(url: str, process: subprocess.Popen, log_file: Path) -> bool:
    if process.poll() is not None:
        tail = log_file.read_text(errors="replace")[-2000:] if log_file.exists() else ""
        raise RunFailed(f"the app exited with code {process.returncode} while starting:\n{tail}")
    try:
        return httpx.get(url + "/status", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def start_instance(app_dir: Path, input_dir: Path, output_dir: Path, log_file: Path,
                   engine_waits: dict) -> AppInstance:
    """Start the app in `app_dir` and wait until its API answers."""
    check_requirements(app_dir)
    port = _free_port()
    argv = [str(apps_python()), str(APP_HOST), str(app_dir), str(port), json.dumps(engine_waits)]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONUNBUFFERED": "1", "HOME": str(output_dir),
           "FEDSIM_INPUT_DIR": str(input_dir), "FEDSIM_OUTPUT_DIR": str(output_dir)}
    if os.geteuid() == 0:
        for mount_point in MOUNT_POINTS:
            mount_point.mkdir(parents=True, exist_ok=True)
        # private mount namespace: this instance alone sees its folders at /mnt/input and /mnt/output
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount --bind "$1" /mnt/input && mount --bind "$2" /mnt/output && shift 2 && exec "$@"', "sh",
                str(input_dir), str(output_dir), *argv]
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as log:
        process = subprocess.Popen(argv, cwd=app_dir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    instance = AppInstance(process, f"http://127.0.0.1:{port}/api", log_file)
    try:
        if not wait_until(lambda: _answers(instance.url, process, log_file), START_TIMEOUT):
            raise RunFailed(f"the app in {app_dir} did not answer within {START_TIMEOUT:.0f} s; see {log_file}")
    except BaseException:
        instance.stop()
        raise
    return instance
