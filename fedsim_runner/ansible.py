"""Run FedSim's playbooks through ansible-runner.

Every run gets a FRESH private data dir that is deleted afterwards: ansible-runner writes extravars and env there in
clear text. Secrets (the operator's credentials) go into a 0600 vars file inside it, passed with `-e @file`, so they
never reach ansible-runner's env/extravars, the run directory or the log; the tasks that use them are `no_log`.
Events drive a progress display and the run log (through `run_log.log`, whose redaction filter applies); a failed or
unreachable host becomes a RunFailed that names the host and the task.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ansible_runner
import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn

from fedsim_runner.config import REPO_ROOT
from fedsim_runner.errors import ConfigError, RunFailed

PLAYBOOKS = REPO_ROOT / "playbooks"
log = logging.getLogger("fedsim_runner.ansible")


def _secret_values(obj: Any) -> Iterable[str]:
    if isinstance(obj, Mapping):
        for v in obj.values():
            yield from _secret_values(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            yield from _secret_values(v)
    elif obj is not None and str(obj):
        yield str(obj)


@contextmanager
def _restored(handlers: Mapping[int, Any]) -> Iterator[None]:
    try:
        yield
    finally:
        if threading.current_thread() is threading.main_thread():
            for sig, handler in handlers.items():
                if handler is not None:  # None: set outside Python, cannot be put back
                    signal.signal(sig, handler)


def _playbook_path(playbook: str | Path) -> Path:
    p = Path(playbook)
    for candidate in (p, REPO_ROOT / p, PLAYBOOKS / p, PLAYBOOKS / f"{p}.yml"):
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(f"playbook {playbook}: not found; use one of {', '.join(sorted(q.name for q in PLAYBOOKS.glob('*.yml')))}")


def _failure_text(res: dict) -> str:
    """What a failed result says: a loop's failed items' messages, a command's last stderr line, else its msg."""
    items = [r for r in res.get("results") or [] if isinstance(r, dict) and r.get("failed")]
    if items:
        return "; ".join(_failure_text(r) for r in items)
    msg = res.get("msg") or res.get("reason") or "failed"
    if isinstance(msg, list):
        msg = "; ".join(map(str, msg))
    stderr = (res.get("stderr") or "").strip().splitlines()
    return f"{msg}: {stderr[-1]}" if stderr else str(msg)


class _Events:
    """ansible-runner's event stream → counts per host, the log, the progress display, and the first failure."""

    def __init__(self, name: str, logger: logging.Logger, progress, secrets: list[str]) -> None:
        self.name = name
        self.log = logger
        self.progress = progress
        self.secrets = sorted(set(secrets), key=len, reverse=True)
        self.failure: tuple[str, str, str] | None = None
        self.changed: dict[str, int] = {}
        self._task = ""
        self._own: Progress | None = None
        self._rows: dict[str, Any] = {}

    def redact(self, text: str) -> str:
        for s in self.secrets:
            text = text.replace(s, "***")
        return text

    def __enter__(self) -> _Events:
        if self.progress is None:
            console = Console(stderr=True)
            self._own = Progress(SpinnerColumn(), TextColumn("{task.fields[host]:<14}"), BarColumn(bar_width=20),
                                 TextColumn("{task.description}"), console=console, disable=not console.is_terminal)
            self._own.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._own is not None:
            self._own.stop()

    def _show(self, host: str, text: str) -> None:
        if self.progress is not None:
            if host in getattr(self.progress, "_sites", {}):
                self.progress.site_step(host, text)
            return
        if self._own is not None:
            if host not in self._rows:
                self._rows[host] = self._own.add_task(text, total=None, host=host)
            self._own.update(self._rows[host], description=text, advance=1)

    def __call__(self, event: dict) -> bool:
        kind = event.get("event", "")
        data = event.get("event_data", {}) or {}
        host = data.get("host") or ""
        task = data.get("task") or ""
        if kind == "playbook_on_task_start":
            self._task = task
        elif kind == "runner_on_start":
            self._show(host, task)
        elif kind in ("runner_on_ok", "runner_on_skipped"):
            changed = bool((data.get("res") or {}).get("changed"))
            self.changed[host] = self.changed.get(host, 0) + int(changed)
            if kind == "runner_on_ok":
                self.log.debug("ansible %s: %s: %s%s", self.name, host, task, " (changed)" if changed else "")
        elif kind in ("runner_on_failed", "runner_on_unreachable") and not data.get("ignore_errors"):
            msg = self.redact(" ".join(_failure_text(data.get("res") or {}).split()))
            what = "unreachable" if kind == "runner_on_unreachable" else "failed"
            self.log.error("ansible %s: %s: task '%s' %s: %s", self.name, host, task, what, msg)
            if self.failure is None:
                self.failure = (host, task, f"{what}: {msg}")
            self._show(host, f"failed: {task}")
        elif kind == "playbook_on_stats":
            for h in set(data.get("ok", {})) | set(data.get("failures", {})) | set(data.get("dark", {})):
                self._show(h, "done")
        return True  # keep the event (False would also drop the stats)


def run_playbook(playbook: str | Path, inventory: str | Path, extravars: Mapping[str, Any] | None = None,
                 run_log=None, secrets: Mapping[str, Any] | None = None, *, progress=None, limit: str | None = None,
                 tags: str | None = None) -> dict[str, Any]:
    """Run one playbook and return its stats ({ok, changed, failures, dark, skipped, …: {host: n}}).

    `secrets`: extra vars that hold secrets (e.g. {"fedsim_credentials": {...}}); only a deleted 0600 file sees them.
    `run_log`: the RunDir (its logger and redactor); `progress`: a RunProgress whose site rows show the tasks.
    """
    path = _playbook_path(playbook)
    inventory = Path(inventory)
    if not inventory.is_file():
        raise ConfigError(f"{inventory}: no inventory; write it with `python -m fedsim_runner inventory --config FILE`")
    values = list(_secret_values(secrets or {}))
    if run_log is not None:
        run_log.add_secrets(values)
    logger = run_log.log if run_log is not None else log
    private = Path(tempfile.mkdtemp(prefix="fedsim-ansible-"))  # mode 0700
    try:
        cmdline = []
        if secrets:
            vars_file = private / "secrets.yml"
            fd = os.open(vars_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                yaml.safe_dump(dict(secrets), f)
            cmdline += ["-e", f"@{vars_file}"]
        if tags:
            cmdline += ["--tags", tags]
        env = {
            "ANSIBLE_CONFIG": str(REPO_ROOT / "ansible.cfg"),
            "ANSIBLE_ROLES_PATH": str(REPO_ROOT / "roles"),
            "ANSIBLE_NOCOLOR": "1",
            # the venv's ansible-playbook and its python first
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        name = path.stem
        logger.info("ansible %s: starting (inventory %s)", name, inventory)
        # ansible-runner swaps in SIGINT/SIGTERM handlers that only cancel the playbook and never puts ours back:
        # restore them, and turn a cancelled playbook into the interrupt it was
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        with _Events(name, logger, progress, values) as events, _restored(handlers):
            runner = ansible_runner.run(
                private_data_dir=str(private), playbook=str(path), inventory=str(inventory.resolve()),
                extravars=dict(extravars or {}), cmdline=" ".join(cmdline) or None, envvars=env, limit=limit,
                project_dir=str(REPO_ROOT), quiet=True, event_handler=events, suppress_env_files=True,
            )
        if runner.status == "canceled":
            raise KeyboardInterrupt(f"{name}: ansible-playbook cancelled by a signal")
        stats = runner.stats or {}
        changed = sum((stats.get("changed") or {}).values())
        logger.info("ansible %s: %s (rc %s, %d changed)", name, runner.status, runner.rc, changed)
        if runner.status != "successful" or runner.rc != 0:
            if events.failure:
                host, task, msg = events.failure
                raise RunFailed(f"{name} failed on {host} at task '{task}': {msg}")
            raise RunFailed(f"{name}: ansible-playbook ended with status {runner.status} (rc {runner.rc}); see fedsim.log")
        return stats
    finally:
        shutil.rmtree(private, ignore_errors=True)
