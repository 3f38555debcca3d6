"""Process sites (no root): per site its own folder tree (home, data, logs), environment and block of ports, all on
127.0.0.1 and as the user running FedSim. The same interface as namespace sites, without the isolation only root
can give: a site's processes could read another site's files.

Every process popen starts leads its own session; its PID and start time are recorded in the site's `pids` file so
that `down`, also from another process, stops what is still running (the whole process group).
"""

from __future__ import annotations

import getpass
import os
import signal
import socket
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from fedsim_runner.backoff import wait_until
from fedsim_runner.errors import RunFailed
from fedsim_runner.sites.base import (
    PORTS_PER_SITE,
    Provider,
    SiteHandle,
    alive,
    log_label,
    proc_start_time,
    remove_site_dir,
)

PORT_RANGE = (20000, 30000)  # process sites take PORTS_PER_SITE-port blocks from here, free when the site comes up
STOP_GRACE = 5.0


def _block_free(first: int) -> bool:
    for port in range(first, first + PORTS_PER_SITE):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


class ProcessProvider(Provider):
    kind = "process"

    def up(self) -> list[SiteHandle]:
        with self.locked():
            state = self.read_state()
            sites: dict[str, dict] = state.get("sites", {})
            wanted = [s.name for s in self.cfg.sites]
            for name in [n for n in sites if n not in wanted]:
                self._remove_site(SiteHandle.from_json(sites.pop(name)))
            taken = {d["port_base"] for d in sites.values()}
            candidates = (p for p in range(*PORT_RANGE, PORTS_PER_SITE) if p not in taken and _block_free(p))
            for name in wanted:
                if name in sites and Path(sites[name]["home"]).is_dir():
                    continue
                port_base = next(candidates, None)
                if port_base is None:
                    raise RunFailed(f"site {name}: no free block of {PORTS_PER_SITE} ports in {PORT_RANGE}")
                sdir = self.state_dir / name
                h = SiteHandle(name=name, user=getpass.getuser(), home=sdir / "home", home_in_site=str(sdir / "home"),
                               address="127.0.0.1",
                               gateway="127.0.0.1", logs=sdir / "logs", port_base=port_base, extra={"dir": str(sdir)})
                for d in (h.home, sdir / "data", h.logs):
                    d.mkdir(parents=True, exist_ok=True)
                os.chmod(h.home, 0o700)
                sites[name] = h.to_json()
            self.write_state({"kind": self.kind, "project": self.project, "sites": sites})
        return self.handles()

    def popen(self, site: str | SiteHandle, argv: Sequence[str], env: Mapping[str, str] | None = None,
              cwd: str | None = None, user: bool = True, **popen_kwargs) -> subprocess.Popen:
        h = self.handle(site)
        full_env = {"PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"), "HOME": str(h.home),
                    "USER": h.user, **(env or {})}
        popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs = {"env": full_env, "cwd": cwd or h.home, "start_new_session": True, **popen_kwargs}
        if "stdout" in popen_kwargs:
            proc = subprocess.Popen(list(argv), **kwargs)
        else:
            with open(h.logs / f"{log_label(argv)}.log", "ab") as out:
                proc = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT, **kwargs)
        with open(Path(h.extra["dir"]) / "pids", "a") as f:
            f.write(f"{proc.pid} {proc_start_time(proc.pid)}\n")
        return proc

    def down(self, keep_logs: bool = False) -> None:
        with self.locked():
            for d in self.read_state().get("sites", {}).values():
                self._remove_site(SiteHandle.from_json(d), keep_logs)
            if keep_logs:
                self.write_state({"kind": self.kind, "project": self.project, "sites": {}})
            else:
                self.state_file.unlink(missing_ok=True)
                (self.state_dir / ".lock").unlink(missing_ok=True)
        if not keep_logs:
            try:
                self.state_dir.rmdir()
            except OSError:
                pass  # something not ours lives there

    def _remove_site(self, h: SiteHandle, keep_logs: bool = False) -> None:
        sdir = Path(h.extra["dir"])
        groups = []
        try:
            for line in (sdir / "pids").read_text().splitlines():
                pid, start = line.split()
                if start != "None" and alive(int(pid), int(start)):
                    groups.append(int(pid))
        except FileNotFoundError:
            pass
        _stop_groups(groups)
        remove_site_dir(sdir, keep_logs)


def _stop_groups(groups: list[int]) -> None:
    """SIGTERM each process group, SIGKILL what is left after STOP_GRACE seconds."""

    def signal_all(sig: int) -> None:
        for pgid in groups:
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                pass

    def gone() -> bool:
        return not _live_members(set(groups))

    if not groups:
        return
    signal_all(signal.SIGTERM)
    if not wait_until(gone, STOP_GRACE):
        signal_all(signal.SIGKILL)
        wait_until(gone, STOP_GRACE)


def _live_members(groups: set[int]) -> list[int]:
    """PIDs of running (not zombie) processes in these process groups."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[2]) in groups and fields[0] not in ("Z", "X"):
                found.append(int(entry.name))
    return found
