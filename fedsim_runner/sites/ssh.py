"""SSH sites: existing hosts listed in the project file (cloud VMs such as Biosphère, hospital servers).

`up` logs in to every host in parallel (and to nothing else) and records what the login shows: the user's home and
the orchestrator's address as the host sees it (the gateway). Host keys are trusted on first use and pinned in the
project's own known_hosts. Installing a key for each site user is the Ansible task `copy_key` asks for, not this module.
`down` forgets the hosts: services on them are stopped by `services.yml`.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fedsim_runner.errors import RunFailed
from fedsim_runner.sites.base import Provider, SiteHandle, log_label

CONNECT_TIMEOUT = 10
PORT_BASE = 8000


def ssh_command(h: SiteHandle, known_hosts: Path) -> list[str]:
    cmd = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={CONNECT_TIMEOUT}", "-o", "LogLevel=ERROR",
           "-o", "StrictHostKeyChecking=accept-new", "-o", f"UserKnownHostsFile={known_hosts}", "-p", str(h.ssh_port)]
    if h.ssh_key:
        cmd += ["-i", str(h.ssh_key), "-o", "IdentitiesOnly=yes"]
    return [*cmd, f"{h.ssh_user}@{h.ssh_host}"]


def remote_command(argv: Sequence[str], env: Mapping[str, str], cwd: str | None) -> str:
    """The shell line that runs argv on the host with exactly `env` (plus the login's PATH/HOME/USER) and stops it
    when the ssh connection ends: a watcher kills it when stdin (held open by the local ssh) reaches EOF."""
    assignments = " ".join(shlex.quote(f"{k}={v}") for k, v in env.items())
    run = f"env -i PATH=\"$PATH\" HOME=\"$HOME\" USER=\"$USER\" {assignments} {shlex.join(argv)} </dev/null"
    cd = f"cd {shlex.quote(cwd)} && " if cwd else ""
    # fd 3: background jobs of a non-interactive shell get /dev/null as stdin unless redirected explicitly
    return (f"exec 3<&0; {cd}{{ {run} & p=$!; {{ cat <&3 >/dev/null; kill $p; }} >/dev/null 2>&1 & w=$!; "
            "wait $p; rc=$?; kill $w 2>/dev/null; exit $rc; }")


def ssh_popen(h: SiteHandle, known_hosts: Path, argv: Sequence[str], env: Mapping[str, str] | None,
              cwd: str | None, **popen_kwargs) -> subprocess.Popen:
    """Run argv on a remote site as its ssh user; the Popen is the local ssh, and stopping it stops the command."""
    cmd = [*ssh_command(h, known_hosts), remote_command(argv, env or {}, cwd)]
    # ssh's stdin is a pipe that only the returned Popen holds open: its EOF (this process or the Popen gone, or the
    # connection closed by killing ssh) is the remote watcher's stop signal; communicate() cannot close it early
    keep_open, popen_kwargs["stdin"] = _stdin_pipe()
    if "stdout" in popen_kwargs:
        proc = subprocess.Popen(cmd, **popen_kwargs)
    else:
        h.logs.mkdir(parents=True, exist_ok=True)
        with open(h.logs / f"{log_label(argv)}.log", "ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, **popen_kwargs)
    os.close(popen_kwargs["stdin"])
    proc.fedsim_keep_open = keep_open
    return proc


def _stdin_pipe():
    read_end, write_end = os.pipe()
    return os.fdopen(write_end, "wb"), read_end


class SshProvider(Provider):
    kind = "ssh"

    @property
    def known_hosts(self) -> Path:
        return self.state_dir / "known_hosts"

    def _site_handle(self, site) -> SiteHandle:
        return SiteHandle(name=site.name, user=site.user, home=Path("~"), home_in_site="~", address=site.address or site.host,
                          gateway="", logs=self.state_dir / site.name / "logs", port_base=PORT_BASE,
                          ssh_host=site.host, ssh_port=site.port, ssh_user=site.user,
                          ssh_key=self.cfg.resolve(site.ssh_key) if site.ssh_key else None)

    def _login(self, h: SiteHandle) -> SiteHandle:
        r = subprocess.run([*ssh_command(h, self.known_hosts), 'echo "$HOME"; echo "$SSH_CLIENT"'],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=CONNECT_TIMEOUT * 3)
        lines = r.stdout.splitlines()
        if r.returncode != 0 or len(lines) < 2 or not lines[1].split():
            reason = (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[-1]
            raise RunFailed(f"site {h.name}: cannot log in to {h.ssh_user}@{h.ssh_host}:{h.ssh_port} ({reason}); "
                            f"check host, port, user and ssh_key of this site in {self.cfg.path}")
        h.home, h.home_in_site, h.gateway = Path(lines[0]), lines[0], lines[1].split()[0]
        h.logs.mkdir(parents=True, exist_ok=True)
        return h

    def up(self) -> list[SiteHandle]:
        with self.locked():
            handles = [self._site_handle(s) for s in self.cfg.sites]
            with ThreadPoolExecutor(max_workers=min(16, len(handles))) as pool:
                futures = [pool.submit(self._login, h) for h in handles]
            errors = [f.exception() for f in futures if f.exception()]
            if errors:
                raise errors[0]
            self.write_state({"kind": self.kind, "project": self.project,
                              "sites": {h.name: h.to_json() for h in handles}})
        return self.handles()

    def popen(self, site: str | SiteHandle, argv: Sequence[str], env: Mapping[str, str] | None = None,
              cwd: str | None = None, user: bool = True, **popen_kwargs) -> subprocess.Popen:
        if not user:
            raise RunFailed(f"site {site if isinstance(site, str) else site.name}: ssh sites run commands only as "
                            "their ssh user; use an Ansible task with become for root")
        return ssh_popen(self.handle(site), self.known_hosts, argv, env, cwd, **popen_kwargs)

    def down(self, keep_logs: bool = False) -> None:
        with self.locked():
            for site in self.cfg.sites if not keep_logs else []:
                shutil.rmtree(self.state_dir / site.name, ignore_errors=True)
            self.known_hosts.unlink(missing_ok=True)
            self.state_file.unlink(missing_ok=True)
            (self.state_dir / ".lock").unlink(missing_ok=True)
        try:
            self.state_dir.rmdir()
        except OSError:
            pass  # kept logs, or something not ours
