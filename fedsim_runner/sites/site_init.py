"""PID 1 of a namespace site: builds the site's filesystem view, starts its sshd, then becomes a reaper shell.

Started by the namespace provider as `nsenter --net=/run/netns/<ns> unshare --mount --uts --ipc --pid --fork
--mount-proc python3 -I -S site_init.py SITE STATE_DIR STATE_ROOT ADDRESS`, i.e. already inside the site's network,
mount, UTS, IPC and PID namespaces (mount propagation private). Standard library only, no FedSim imports: it runs
with `-I -S` for a fast start. Prints `ready` on stdout once sshd accepts connections; errors go to stderr (the
site's init.log) and end the process, which the provider reports.
"""

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time

OVERLAID = ("etc", "home", "root", "opt", "var", "usr")
SSHD_CONFIG = "/etc/ssh/sshd_config_fedsim"
MS_NOSUID, MS_NODEV, MS_BIND, MS_REC = 2, 4, 4096, 16384
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))  # FedSim's checkout
MNT_DETACH = 2
libc = ctypes.CDLL(None, use_errno=True)


def mount(source: str, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    if libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None, flags,
                  data.encode() if data else None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype or 'bind'} on {target}: {os.strerror(err)}")


def detach_namespace_files() -> None:
    """Unmount the copies of /run/netns/* (nsfs) this mount namespace inherited: they would keep other sites'
    network namespaces (and so their veth links) alive after those sites are removed."""
    targets = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split()[0] == "nsfs":
                targets.append(left.split()[4].encode().decode("unicode_escape"))
    for target in sorted(targets, key=len, reverse=True):
        libc.umount2(target.encode(), MNT_DETACH)


def build_filesystem(state_dir: str, state_root: str) -> None:
    detach_namespace_files()
    for d in OVERLAID:  # copy-on-write views: the site writes only to its upper dirs
        mount("overlay", f"/{d}", "overlay", 0,
              f"lowerdir=/{d},upperdir={state_dir}/upper/{d},workdir={state_dir}/work/{d}")
    mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    os.mkdir("/run/sshd", 0o755)
    if REPO.startswith("/tmp/"):  # a checkout under /tmp (a CI clone): sites run its venvs, so it stays visible
        inside = f"{state_dir}/tmp{REPO[len('/tmp'):]}"
        os.makedirs(inside, exist_ok=True)
        mount(REPO, inside, None, MS_BIND | MS_REC)
    mount(f"{state_dir}/tmp", "/tmp", None, MS_BIND | MS_REC)
    mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    # last: hides every site's state (upper dirs, keys, logs) from this site; the overlays keep their references
    mount("tmpfs", state_root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0700")


def wait_for_port(address: str, port: int, proc: subprocess.Popen, timeout: float = 10.0) -> None:
    deadline, delay = time.monotonic() + timeout, 0.002
    while True:
        try:
            socket.create_connection((address, port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"sshd exited with code {proc.returncode}") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"sshd does not accept connections on {address}:{port} after {timeout:.0f} s") from None
            time.sleep(delay)  # backoff while sshd binds its socket
            delay = min(delay * 2, 0.1)


# PID 1 from then on: a shell that reaps every child (its `wait` collects adopted orphans too) and exits on SIGTERM,
# which ends the site (the kernel kills the rest); ~0.3 MB instead of this interpreter's ~6 MB.
REAPER = 'trap "exit 0" TERM INT; while :; do sleep 2147483647 & wait $!; done'


def main() -> None:
    site, state_dir, state_root, address = sys.argv[1:5]
    try:
        socket.sethostname(site)
        build_filesystem(state_dir, state_root)
        with open("/proc/sys/net/ipv6/conf/eth0/disable_ipv6", "w") as f:
            f.write("1")  # IPv4 only: no link-local path around the /30
        sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", SSHD_CONFIG], stdin=subprocess.DEVNULL, stdout=2)
        wait_for_port(address, 22, sshd)
    except (OSError, RuntimeError) as e:
        print(f"site {site}: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    print("ready", flush=True)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # the provider stops reading; later writes must not hit a closed pipe
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # an ignored signal would stay ignored across exec
    os.execv("/bin/sh", ["sh", "-c", REAPER])


if __name__ == "__main__":
    main()
