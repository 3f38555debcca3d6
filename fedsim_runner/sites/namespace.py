"""Namespace sites (root): each site a network + mount + UTS + IPC + PID namespace with its own sshd and unix user.

Per site:
- network: a netns `<prefix>-<site>` joined to the host by its own veth pair `<prefix>h<slot>` (host end, the site's
  gateway, .1 of a /30 of provider.subnet) ↔ `eth0` (the site, .2). No bridge, forwarding and IPv6 off on the host
  end, and the site has no default route: it reaches its gateway and nothing else. The whole subnet is routed
  `unreachable` on the host before any site exists, so a wrong address fails here instead of leaving the machine.
- filesystem: overlays over /etc, /home, /root, /opt, /var and /usr whose upper dirs live in the site's state folder
  (`<state>/<site>/upper/…`, outside every overlaid path), a tmpfs /run, its own /tmp and /dev/shm, and the state
  root hidden behind a tmpfs (no site sees another site's upper dirs or the orchestrator's key).
- a long-lived PID 1 (`site_init.py`) started by `unshare` inside the netns; everything that runs in the site enters
  its namespaces with `nsenter -t <that PID>`. Killing it ends every process of the site.
- a unix user named after the site (uid unique per address, password '*' so that sshd with `UsePAM no` accepts key
  login), sshd with the site's own host key on <address>:22, and the project's key pair (0600, orchestrator-owned)
  authorised for the site user and for root (Ansible connects as root; the site user has no sudo).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import select
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fedsim_runner.backoff import wait_until
from fedsim_runner.config import Config
from fedsim_runner.errors import ConfigError, RunFailed
from fedsim_runner.sites.base import (
    Provider,
    SiteHandle,
    alive,
    log_label,
    proc_start_time,
    remove_site_dir,
    state_root,
)

SITE_INIT = Path(__file__).with_name("site_init.py")
OVERLAID = ("etc", "home", "root", "opt", "var", "usr")
TOOLS = ("ip", "nsenter", "unshare", "setpriv", "ssh-keygen", "env")
SSHD = "/usr/sbin/sshd"
PYTHON = "/usr/bin/python3"  # Debian's: the one both venvs are made from
USER_PATH = "/usr/local/bin:/usr/bin:/bin"
ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PORT_BASE = 8000  # every namespace site has its own address, so all may use the same ports
READY_TIMEOUT = 20.0
UID_BASE = 200_000  # far above the host's users; one uid per /30 so that no two sites (of any project) share one
SSHD_CONFIG = """\
# FedSim namespace site {site}: written by fedsim_runner/sites/namespace.py
ListenAddress {address}:22
HostKey /etc/ssh/ssh_host_ed25519_key
PidFile none
UsePAM no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
AuthorizedKeysFile .ssh/authorized_keys
StrictModes yes
UseDNS no
X11Forwarding no
AllowTcpForwarding no
PrintMotd no
MaxStartups 100:30:200
Subsystem sftp internal-sftp
"""


def link_prefix(project: str) -> str:
    """`fs` + 5 hex digits of the project name: names of this project's links and netns (link names ≤ 15 chars)."""
    return "fs" + hashlib.sha1(project.encode()).hexdigest()[:5]


def _ip(*args: str, netns: str | None = None, batch: Sequence[str] | None = None, check: bool = True) -> str:
    cmd = ["ip", *(["-n", netns] if netns else []), *args]
    if batch is not None:
        cmd += ["-batch", "-"]
    r = subprocess.run(cmd, input="\n".join(batch or []) + "\n" if batch else None, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RunFailed(f"`{' '.join(cmd)}` failed: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (FileNotFoundError, ProcessLookupError):
        return []


def _mirror_dirs(upper: Path, inside: str) -> Path:
    """Create `inside` (an absolute path in the site) under the upper dirs, each level with the lower dir's owner and
    mode: a directory present in an upper dir shows the upper's attributes in the site."""
    target = upper
    for part in Path(inside).parts[1:]:
        target = target / part
        lower = Path("/", *target.relative_to(upper).parts)
        if not target.exists():
            target.mkdir()
            if lower.is_dir():
                st = lower.stat()
                os.chown(target, st.st_uid, st.st_gid)
                os.chmod(target, st.st_mode & 0o7777)
    return target


def _write(path: Path, text: str, mode: int, uid: int = 0, gid: int = 0) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chown(path, uid, gid)
    os.chmod(path, mode)


def _without_password(entry: str) -> str:
    """A shadow/gshadow line with its password field set to '*' (no password can match; key login still works)."""
    fields = entry.split(":")
    if len(fields) > 1:
        fields[1] = "*"
    return ":".join(fields)


class SitePopen(subprocess.Popen):
    """The `nsenter` of a site process. Signals go to the process inside (nsenter forwards none); SIGKILL also ends
    nsenter, and the process inside dies with it (its parent-death signal)."""

    def send_signal(self, sig: int) -> None:
        self.poll()
        if self.returncode is not None:
            return
        inner = _children(self.pid)
        for pid in inner:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if not inner or sig == signal.SIGKILL:
            super().send_signal(sig)


class NamespaceProvider(Provider):
    kind = "namespace"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.prefix = link_prefix(self.project)
        self.subnet = ipaddress.ip_network(cfg.provider.subnet)
        self.key = self.state_dir / "ssh" / "id_ed25519"

    # ---- up --------------------------------------------------------------------------------------------------------
    def up(self) -> list[SiteHandle]:
        self._preflight()
        self._check_subnet()  # before anything is written
        with self.locked():
            state = self.read_state()
            sites: dict[str, dict] = state.get("sites", {})
            wanted = [s.name for s in self.cfg.sites]
            moved = state.get("subnet", str(self.subnet)) != str(self.subnet)  # provider.subnet was edited
            for name, d in list(sites.items()):
                h = SiteHandle.from_json(d)
                if moved or name not in wanted or not self._is_up(h):
                    self._remove_site(h)
                    del sites[name]
            if moved:
                self._remove_unreachable_route(state["subnet"])
            self._ensure_unreachable_route()
            self._ensure_key()
            used = {d["extra"]["slot"] for d in sites.values()}
            free = (i for i in range(self.subnet.num_addresses // 4) if i not in used)
            todo = [(name, next(free, None)) for name in wanted if name not in sites]
            if any(slot is None for _, slot in todo):
                raise ConfigError(f"{self.cfg.where('provider.subnet')}: {self.subnet} has room for "
                                  f"{self.subnet.num_addresses // 4} sites, not {len(wanted)}; use a larger range")
            errors = []
            if todo:
                with ThreadPoolExecutor(max_workers=min(16, len(todo))) as pool:
                    for (name, _), fut in zip(todo, [pool.submit(self._create_site, *t) for t in todo], strict=True):
                        try:
                            sites[name] = fut.result().to_json()
                        except RunFailed as e:
                            errors.append(e)
            self.write_state({"kind": self.kind, "project": self.project, "subnet": str(self.subnet),
                              "prefix": self.prefix, "sites": sites})
            if errors:
                raise errors[0]
        return self.handles()

    def _preflight(self) -> None:
        if os.geteuid() != 0:
            raise ConfigError(f"{self.cfg.where('provider.isolation')}: namespace sites need root; run as root or "
                              'set isolation = "process"')
        taken = {line.split(":")[0] for line in Path("/etc/passwd").read_text().splitlines()}
        for s in self.cfg.sites:
            if s.name in taken:
                raise ConfigError(f"{self.cfg.where(f'sites.{s.name}.name')}: {s.name!r} is a user on this machine "
                                  "and namespace sites name their user after the site; rename the site")
        missing = [t for t in TOOLS if shutil.which(t) is None] + [p for p in (SSHD, PYTHON) if not Path(p).exists()]
        if missing:
            raise ConfigError(f"{self.cfg.where('provider.isolation')}: namespace sites need {', '.join(missing)}; "
                              "install iproute2, util-linux, openssh-server (`make system`) or use isolation = \"process\"")

    def _check_subnet(self) -> None:
        """Refuse a range that the host already uses (other than for this project's own sites)."""
        for route in json.loads(_ip("-j", "-4", "route", "show") or "[]"):
            dst = route.get("dst", "default")
            if dst == "default":
                continue
            net = ipaddress.ip_network(dst if "/" in dst else f"{dst}/32", strict=False)
            ours = route.get("dev", "").startswith(self.prefix) or (route.get("type") == "unreachable" and net == self.subnet)
            if net.overlaps(self.subnet) and not ours:
                raise ConfigError(f"{self.cfg.where('provider.subnet')}: {self.subnet} overlaps the host route {dst} "
                                  f"(dev {route.get('dev', route.get('type', '?'))}); choose another private range")

    def _ensure_unreachable_route(self) -> None:
        if not _ip("route", "show", "exact", str(self.subnet)).strip():
            _ip("route", "add", "unreachable", str(self.subnet))

    def _ensure_key(self) -> None:
        if not self.key.exists():
            self.key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"fedsim-{self.project}",
                            "-f", str(self.key)], check=True, capture_output=True)
        os.chmod(self.key, 0o600)

    def _names(self, site: str, slot: int) -> tuple[str, str]:
        return f"{self.prefix}-{site}", f"{self.prefix}h{slot}"

    def _create_site(self, name: str, slot: int) -> SiteHandle:
        netns, link = self._names(name, slot)
        net = ipaddress.ip_network(f"{self.subnet.network_address + 4 * slot}/30")
        gateway, address = str(net.network_address + 1), str(net.network_address + 2)
        sdir = self.state_dir / name
        h = SiteHandle(name=name, user=name, home=sdir / "upper" / "home" / name, home_in_site=f"/home/{name}",
                       address=address, gateway=gateway, logs=sdir / "logs", port_base=PORT_BASE, ssh_host=address, ssh_port=22, ssh_user="root",
                       ssh_key=self.key, extra={"slot": slot, "netns": netns, "link": link, "dir": str(sdir)})
        try:
            self._prepare_filesystem(h, sdir)
            self._create_network(h)
            self._start_init(h, sdir)
        except (RunFailed, OSError, subprocess.CalledProcessError) as e:
            self._remove_site(h)
            raise RunFailed(f"site {name}: could not be brought up: {e}") from None
        return h

    def _prepare_filesystem(self, h: SiteHandle, sdir: Path) -> None:
        if sdir.exists():  # left over from an interrupted up: start clean
            shutil.rmtree(sdir)
        for d in OVERLAID:
            (sdir / "upper" / d).mkdir(parents=True)
            (sdir / "work" / d).mkdir(parents=True)
            st = Path("/", d).stat()
            os.chown(sdir / "upper" / d, st.st_uid, st.st_gid)
            os.chmod(sdir / "upper" / d, st.st_mode & 0o7777)
        (sdir / "tmp").mkdir()
        os.chmod(sdir / "tmp", 0o1777)
        h.logs.mkdir()
        upper = sdir / "upper"
        user, uid = h.user, UID_BASE + (int(ipaddress.ip_address(h.address)) >> 2) % 1_000_000
        days = int(time.time() // 86400)
        etc = upper / "etc"
        # the site's accounts: the host's plus the site user (password '*': no password, not locked)
        for fname, line, mode, group in (
            ("passwd", f"{user}:x:{uid}:{uid}:FedSim site {user}:/home/{user}:/bin/bash", 0o644, 0),
            ("group", f"{user}:x:{uid}:", 0o644, 0),
            ("shadow", f"{user}:*:{days}:0:99999:7:::", 0o640, Path("/etc/shadow").stat().st_gid),
            ("gshadow", f"{user}:!::", 0o640, Path("/etc/gshadow").stat().st_gid),
        ):
            text = Path("/etc", fname).read_text()
            if fname in ("shadow", "gshadow"):  # no host password works in a site: `su` cannot lead to host root
                text = "".join(_without_password(entry) + "\n" for entry in text.splitlines() if entry)
            _write(etc / fname, text + ("" if text.endswith("\n") else "\n") + line + "\n", mode, 0, group)
        _write(etc / "hostname", f"{h.name}\n", 0o644)
        _write(etc / "hosts", f"127.0.0.1\tlocalhost\n{h.address}\t{h.name}\n{h.gateway}\torchestrator\n", 0o644)
        ssh_dir = _mirror_dirs(upper, "/etc/ssh")
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{h.name}@fedsim",
                        "-f", str(ssh_dir / "ssh_host_ed25519_key")], check=True, capture_output=True)
        _write(ssh_dir / "sshd_config_fedsim", SSHD_CONFIG.format(site=h.name, address=h.address), 0o644)
        pub = self.key.with_suffix(".pub").read_text()
        home = _mirror_dirs(upper, "/home") / user
        for d in (home, home / ".ssh"):
            d.mkdir(mode=0o700)
            os.chown(d, uid, uid)
            os.chmod(d, 0o700)
        _write(home / ".ssh" / "authorized_keys", pub, 0o600, uid, uid)
        root_ssh = _mirror_dirs(upper, "/root/.ssh")
        os.chmod(root_ssh, 0o700)
        _write(root_ssh / "authorized_keys", pub, 0o600)

    def _create_network(self, h: SiteHandle) -> None:
        netns, link = h.extra["netns"], h.extra["link"]
        _ip(batch=[f"netns add {netns}", f"link add {link} type veth peer name eth0 netns {netns}"])
        for key, value in (("ipv4/conf/{}/forwarding", "0"), ("ipv6/conf/{}/disable_ipv6", "1")):
            Path("/proc/sys/net", key.format(link)).write_text(value)
        _ip(batch=[f"addr add {h.gateway}/30 dev {link}", f"link set {link} up"])
        _ip(netns=netns, batch=[f"addr add {h.address}/30 dev eth0", "link set eth0 up", "link set lo up"])

    def _start_init(self, h: SiteHandle, sdir: Path) -> None:
        with open(h.logs / "init.log", "ab") as log:
            proc = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{h.extra['netns']}", "--",
                 "unshare", "--mount", "--uts", "--ipc", "--pid", "--fork", "--mount-proc", "--",
                 PYTHON, "-I", "-S", str(SITE_INIT), h.name, str(sdir), str(state_root()), h.address],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, start_new_session=True, env={},
            )  # fmt: skip
        # the site outlives this call (and maybe this process): a daemon thread reaps it whenever it ends
        threading.Thread(target=proc.wait, name=f"reap-site-{h.name}", daemon=True).start()
        h.extra.update(unshare_pid=proc.pid, unshare_start=proc_start_time(proc.pid))
        ready, _, _ = select.select([proc.stdout], [], [], READY_TIMEOUT)
        line = proc.stdout.readline().decode().strip() if ready else ""
        proc.stdout.close()
        if line != "ready":
            reason = (h.logs / "init.log").read_text().strip().splitlines()[-1:] or ["no answer"]
            raise RunFailed(reason[0] if ready else f"not ready after {READY_TIMEOUT:.0f} s")
        init = _children(proc.pid)
        if len(init) != 1:
            raise RunFailed("its init process is missing")
        h.extra.update(init_pid=init[0], init_start=proc_start_time(init[0]))

    def _is_up(self, h: SiteHandle) -> bool:
        return alive(h.extra.get("init_pid"), h.extra.get("init_start")) and Path("/run/netns", h.extra["netns"]).exists()

    # ---- popen -----------------------------------------------------------------------------------------------------
    def popen(self, site: str | SiteHandle, argv: Sequence[str], env: Mapping[str, str] | None = None,
              cwd: str | None = None, user: bool = True, **popen_kwargs) -> subprocess.Popen:
        h = self.handle(site)
        if not self._is_up(h):
            raise RunFailed(f"site {h.name}: is not running; run `python -m fedsim_runner up --config {self.cfg.path}`")
        name, home = (h.user, f"/home/{h.user}") if user else ("root", "/root")
        full_env = {"PATH": USER_PATH if user else ROOT_PATH, "HOME": home, "USER": name, **(env or {})}
        cmd = ["nsenter", "-t", str(h.extra["init_pid"]), "-m", "-u", "-i", "-n", "-p", "--",
               "setpriv", "--pdeathsig", "KILL", "--no-new-privs"]  # no setuid way out of the site user
        if user:
            cmd += ["--reuid", name, "--regid", name, "--init-groups"]
        cmd += ["--", "env", "-i", "-C", cwd or home, "--", *(f"{k}={v}" for k, v in full_env.items()), *argv]
        popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
        # a site is another machine: a Ctrl-C in the operator's terminal reaches the orchestrator, which stops the
        # site's processes itself, in order
        popen_kwargs.setdefault("start_new_session", True)
        if "stdout" in popen_kwargs:
            return SitePopen(cmd, env={}, **popen_kwargs)
        with open(h.logs / f"{log_label(argv)}.log", "ab") as out:
            return SitePopen(cmd, env={}, stdout=out, stderr=subprocess.STDOUT, **popen_kwargs)

    # ---- down ------------------------------------------------------------------------------------------------------
    def down(self, keep_logs: bool = False) -> None:
        if os.geteuid() != 0:
            raise ConfigError(f"{self.cfg.where('provider.isolation')}: removing namespace sites needs root; run as root")
        with self.locked():
            known = [SiteHandle.from_json(d) for d in self.read_state().get("sites", {}).values()]
            with ThreadPoolExecutor(max_workers=max(1, min(16, len(known)))) as pool:
                list(pool.map(lambda h: self._remove_site(h, keep_logs), known))
            self._sweep()
            subnets = {str(self.subnet), self.read_state().get("subnet", str(self.subnet))}
            if keep_logs:
                self.write_state({"kind": self.kind, "project": self.project, "sites": {}})
            else:  # everything in the state folder is this project's (also site folders of an interrupted up)
                shutil.rmtree(self.state_dir, ignore_errors=True)
        for subnet in subnets:
            self._remove_unreachable_route(subnet)

    def _remove_unreachable_route(self, subnet: str) -> None:
        if _ip("route", "show", "exact", subnet).strip().startswith("unreachable"):
            _ip("route", "del", "unreachable", subnet, check=False)

    def _remove_site(self, h: SiteHandle, keep_logs: bool = False) -> None:
        netns, link = h.extra["netns"], h.extra["link"]
        pids = [p for p in (h.extra.get("init_pid"), h.extra.get("unshare_pid")) if p]
        if Path("/run/netns", netns).exists():  # also processes that were not recorded (an interrupted up)
            pids += [int(p) for p in _ip("netns", "pids", netns, check=False).split()]
        self._kill(pids, h.extra)
        _ip("link", "del", link, check=False)
        _ip("netns", "del", netns, check=False)
        remove_site_dir(Path(h.extra["dir"]), keep_logs)

    def _kill(self, pids: list[int], extra: dict) -> None:
        recorded = {extra.get("init_pid"): extra.get("init_start"), extra.get("unshare_pid"): extra.get("unshare_start")}
        targets = [p for p in dict.fromkeys(pids) if p not in recorded or alive(p, recorded[p])]
        for pid in targets:  # the init first: the kernel then kills everything in the site's PID namespace
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not wait_until(lambda: all(proc_start_time(p) is None for p in targets), timeout=10):
            raise RunFailed(f"processes {targets} of site namespace {extra['netns']} did not exit after SIGKILL")

    def _sweep(self) -> None:
        """Remove what a crashed up may have left without a state entry: this project's netns and links."""
        for ns in Path("/run/netns").glob(f"{self.prefix}-*") if Path("/run/netns").exists() else []:
            self._kill([int(p) for p in _ip("netns", "pids", ns.name, check=False).split()], {"netns": ns.name})
            _ip("netns", "del", ns.name, check=False)
        for line in _ip("-br", "link", "show").splitlines():
            name = line.split()[0].split("@")[0] if line.strip() else ""
            if name.startswith(f"{self.prefix}h"):
                _ip("link", "del", name, check=False)

