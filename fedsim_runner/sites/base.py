"""What every site provider offers (up, handles, popen, down), the handle describing one site, and the state file.

The state file lets `down` (and `inventory`) work from a process other than the one that ran `up`: it records which
sites exist, their addresses and the PIDs that keep them alive. It lives in the project's state folder, which is
`/srv/fedsim/<project>` for root and `$XDG_STATE_HOME/fedsim/<project>` (default ~/.local/state) otherwise;
`FEDSIM_STATE_DIR` replaces the `/srv/fedsim` or `…/fedsim` part.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fedsim_runner.config import Config
from fedsim_runner.errors import ConfigError, RunFailed

STATE_FILE = "sites.json"


@dataclass
class SiteHandle:
    """One site as the rest of FedSim sees it (inventory, cluster, playbooks)."""

    name: str
    user: str  # the site's unix user (process sites: the user running FedSim)
    home: Path  # the user's home as seen from the orchestrator (namespace sites: inside the overlay's upper dir)
    home_in_site: str  # the same folder as processes on the site see it (namespace sites: /home/<user>)
    address: str  # how others reach the site
    gateway: str  # how the site reaches the orchestrator (host end of its veth, or 127.0.0.1)
    logs: Path  # where popen writes the output of site processes (orchestrator side)
    port_base: int  # the site may listen on port_base … port_base + PORTS_PER_SITE - 1 on its address
    ssh_host: str | None = None
    ssh_port: int | None = None
    ssh_user: str | None = None
    ssh_key: Path | None = None
    extra: dict = field(default_factory=dict)  # provider-specific state (pids, link names); not for other modules

    def to_json(self) -> dict:
        d = asdict(self)
        for key in ("home", "logs", "ssh_key"):
            d[key] = None if d[key] is None else str(d[key])
        return d

    @classmethod
    def from_json(cls, d: dict) -> SiteHandle:
        d = dict(d)
        for key in ("home", "logs", "ssh_key"):
            d[key] = None if d.get(key) is None else Path(d[key])
        d.setdefault("home_in_site", f"/home/{d['user']}")  # state files written before the field existed
        return cls(**d)


PORTS_PER_SITE = 20


def state_root() -> Path:
    """The parent of every project's state folder (see the module docstring)."""
    if os.environ.get("FEDSIM_STATE_DIR"):
        return Path(os.environ["FEDSIM_STATE_DIR"])
    if os.geteuid() == 0:
        return Path("/srv/fedsim")
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "fedsim"


class Provider(ABC):
    """A way to get isolated sites. `up` and `down` are idempotent; `down` leaves nothing behind."""

    kind: str

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.project = cfg.project.name
        self.state_dir = state_root() / self.project

    @abstractmethod
    def up(self) -> list[SiteHandle]:
        """Create every site of the project that is not up yet (in parallel where possible) and return all handles."""

    @abstractmethod
    def down(self, keep_logs: bool = False) -> None:
        """Stop and remove every site of the project; nothing of it remains afterwards (but the logs if asked)."""

    @abstractmethod
    def popen(self, site: str | SiteHandle, argv: Sequence[str], env: Mapping[str, str] | None = None,
              cwd: str | None = None, user: bool = True, **popen_kwargs) -> subprocess.Popen:
        """Run `argv` AS the site, with exactly `env` plus PATH/HOME/USER; killing the Popen stops the process."""

    def inventory(self, output: Path | None = None) -> Path:
        """Write the Ansible inventory of the sites that are up (default inventory/<project>.yml)."""
        from fedsim_runner.inventory import write_inventory

        return write_inventory(self.cfg, output=output, handles=self.handles())

    def handles(self) -> list[SiteHandle]:
        """The sites that are up, in project-file order (empty when none)."""
        order = {s.name: i for i, s in enumerate(self.cfg.sites)}
        found = [SiteHandle.from_json(d) for d in self.read_state().get("sites", {}).values()]
        return sorted(found, key=lambda h: order.get(h.name, len(order)))

    def handle(self, site: str | SiteHandle) -> SiteHandle:
        if isinstance(site, SiteHandle):
            return site
        for h in self.handles():
            if h.name == site:
                return h
        raise RunFailed(f"site {site}: not up; run `python -m fedsim_runner up --config {self.cfg.path}`")

    # ---- state file ------------------------------------------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.state_dir / STATE_FILE

    def read_state(self) -> dict:
        try:
            return json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return {}

    def write_state(self, state: dict) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_name(f".{STATE_FILE}.tmp")
        tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
        tmp.replace(self.state_file)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One up/down of this project at a time (a second one waits)."""
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            lock = open(self.state_dir / ".lock", "w")  # noqa: SIM115 (closed below, after the body)
        except OSError as e:
            raise ConfigError(f"{self.state_dir}: cannot create the sites' state folder ({e.strerror}); "
                              "set FEDSIM_STATE_DIR to a writable folder") from None
        with lock as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield


def proc_start_time(pid: int) -> int | None:
    """The start time (clock ticks since boot) of a live, non-zombie process; None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def alive(pid: int | None, start_time: int | None) -> bool:
    """True while the process recorded as (pid, start time) still runs (a reused PID does not count)."""
    return pid is not None and start_time is not None and proc_start_time(pid) == start_time


def remove_site_dir(sdir: Path, keep_logs: bool) -> None:
    """A removed site's state folder: gone, or (keep_logs) everything but its logs/."""
    if not keep_logs:
        shutil.rmtree(sdir, ignore_errors=True)
        return
    for child in sdir.iterdir() if sdir.exists() else []:
        if child.name != "logs":
            shutil.rmtree(child) if child.is_dir() else child.unlink()


def log_label(argv: Sequence[str]) -> str:
    """A log file name for a command: the module after `-m`, else the program's name."""
    args = list(argv)
    if "-m" in args[:-1]:
        return args[args.index("-m") + 1]
    return Path(args[0]).name if args else "process"
