"""Namespace sites for real (root): own hostname, user, network and files per site, sshd with key login, popen inside
the site, and nothing left after `down`. Ranges 10.221.0.0/17 and 10.221.128.0/17 (other suites use 10.222/10.223)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from fedsim_runner.backoff import wait_until
from fedsim_runner.config import load_config
from fedsim_runner.errors import ConfigError, RunFailed
from fedsim_runner.sites import get_provider
from fedsim_runner.sites.base import proc_start_time
from fedsim_runner.sites.namespace import NamespaceProvider, link_prefix
from tests.conftest import REPO, needs_root

pytestmark = [needs_root, pytest.mark.e2e, pytest.mark.root]
SSH_OPTS = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
            "-o", "ConnectTimeout=5", "-o", "LogLevel=ERROR"]


def project_file(tmp: Path, name: str, subnet: str, sites=("alpha", "beta", "gamma")) -> Path:
    entries = "".join(
        f'[[sites]]\nname = "{s}"\nfc_user = "{s}@example.org"\ncoordinator = {"true" if i == 0 else "false"}\n'
        for i, s in enumerate(sites)
    )
    path = tmp / f"{name}.toml"
    path.write_text(textwrap.dedent(f"""\
        [project]
        name = "{name}"
        workflow = "mean"
        [provider]
        isolation = "namespace"
        subnet = "{subnet}"
        """) + entries)
    return path


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    cfg = load_config(project_file(tmp_path_factory.mktemp("ns"), "fstest-ns", "10.221.0.0/17"))
    provider = get_provider(cfg)
    assert isinstance(provider, NamespaceProvider)
    handles = provider.up()
    yield provider, {h.name: h for h in handles}
    provider.down()


def run(provider, site, argv, user=True, env=None, timeout=30):
    proc = provider.popen(site, argv, env=env or {}, user=user, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out.decode(), err.decode()


def test_each_site_has_its_own_hostname_and_user(sites):
    provider, handles = sites
    uids = set()
    for name in handles:
        code, out, err = run(provider, name, ["sh", "-c", "hostname; id -un; id -u; echo $HOME"])
        assert code == 0, err
        hostname, user, uid, home = out.split()
        assert (hostname, user, home) == (name, name, f"/home/{name}")
        uids.add(uid)
    assert len(uids) == len(handles)


def test_popen_runs_as_the_site_user_inside_all_its_namespaces(sites):
    provider, handles = sites
    h = handles["alpha"]
    code, out, err = run(provider, "alpha", ["sh", "-c", "for n in net mnt uts ipc pid; do readlink /proc/self/ns/$n; done"])
    assert code == 0, err
    init = h.extra["init_pid"]
    assert out.split() == [os.readlink(f"/proc/{init}/ns/{n}") for n in ("net", "mnt", "uts", "ipc", "pid")]
    assert out.split()[0] != os.readlink("/proc/self/ns/net")
    code, out, _ = run(provider, "alpha", ["env"], env={"FEDSIM_X": "1"})
    assert dict(line.split("=", 1) for line in out.splitlines()) == {
        "FEDSIM_X": "1", "PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/home/alpha", "USER": "alpha"}
    code, out, _ = run(provider, "alpha", ["id", "-u"], user=False)
    assert out.strip() == "0"


def test_site_user_runs_both_python_environments(sites):
    provider, _ = sites
    for venv, module in ((".venv", "fedsim_runner.site_env"), (".venv-apps", "FeatureCloud")):
        python = REPO / venv / "bin" / "python"
        if not python.exists():
            pytest.skip(f"{python} missing (`make venv`)")
        code, out, err = run(provider, "beta", [str(python), "-c", f"import {module}, os; print(os.getuid())"])
        assert code == 0, err
        assert int(out) != 0


def test_killing_the_popen_stops_the_process_inside(sites):
    provider, _ = sites
    for stop in ("terminate", "kill"):
        proc = provider.popen("gamma", ["sleep", "300"], env={}, stdout=subprocess.DEVNULL)
        inner = wait_until(lambda p=proc: [c for c in Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()], 5)
        assert inner, "nsenter never started the process"
        getattr(proc, stop)()
        proc.wait(timeout=10)
        assert wait_until(lambda i=inner: not Path(f"/proc/{i[0]}").exists(), 5), f"{stop}: process inside survived"


def test_orphans_in_a_site_are_reaped(sites):
    provider, _ = sites
    code, _, err = run(provider, "beta", ["sh", "-c", "for i in 1 2 3; do (sleep 0.05 &); done"])
    assert code == 0, err

    def no_sleep_left() -> bool:
        out = run(provider, "beta", ["ps", "-eo", "stat=,comm="])[1]
        assert not [line for line in out.splitlines() if line.startswith("Z")], out  # PID 1 reaps adopted orphans
        return "sleep 0" not in out and out.count("sleep") <= 1  # only the reaper's own long sleep

    assert wait_until(no_sleep_left, 5)


def _listen_in(provider, site, address, port):
    code = (f"import socket; s = socket.create_server(({address!r}, {port})); print('up', flush=True)\n"
            "while True: s.accept()[0].close()")
    proc = provider.popen(site, ["python3", "-c", code], env={}, stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"up"
    return proc


def _connect_from(provider, site, address, port):
    code = (f"import socket\ntry:\n socket.create_connection(({address!r}, {port}), timeout=3).close(); print('open')\n"
            "except OSError as e: print('refused', e)")
    return run(provider, site, ["python3", "-c", code])[1]


def test_sites_cannot_reach_each_other_but_the_orchestrator_reaches_all(sites):
    provider, handles = sites
    b = handles["beta"]
    listener = _listen_in(provider, "beta", b.address, 9000)
    try:
        for h in handles.values():  # orchestrator → every site's sshd, and the listener in beta
            socket.create_connection((h.address, 22), timeout=3).close()
        socket.create_connection((b.address, 9000), timeout=3).close()
        assert _connect_from(provider, "beta", b.address, 9000).startswith("open")  # it listens
        for port in (22, 9000):
            assert _connect_from(provider, "alpha", b.address, port).startswith("refused")
        assert _connect_from(provider, "alpha", b.gateway, 22).startswith("refused")  # not even beta's gateway
    finally:
        listener.kill()
        listener.wait()


def test_a_site_user_cannot_read_another_sites_files(sites):
    provider, handles = sites
    code, _, err = run(provider, "beta", ["sh", "-c", "mkdir -p ~/.fedsim && umask 077 && echo s3cret > ~/.fedsim/site.env"])
    assert code == 0, err
    dotfile = handles["beta"].home / ".fedsim" / "site.env"
    assert dotfile.read_text() == "s3cret\n"  # the orchestrator sees it through the handle
    assert dotfile.stat().st_mode & 0o777 == 0o600
    for path in ("/home/beta/.fedsim/site.env", str(dotfile)):
        code, out, err = run(provider, "alpha", ["cat", path])
        assert code != 0 and "s3cret" not in out, path
    code, out, _ = run(provider, "alpha", ["cat", str(dotfile)], user=False)  # not even root of alpha sees the state
    assert code != 0
    code, out, _ = run(provider, "alpha", ["cat", "/etc/shadow"], user=False)  # no host password is usable in a site
    assert code == 0 and {line.split(":")[1] for line in out.splitlines()} == {"*"}


def test_ssh_login_with_the_project_key(sites):
    _, handles = sites
    h = handles["gamma"]
    for user in ("gamma", h.ssh_user):
        r = subprocess.run(["ssh", *SSH_OPTS, "-i", str(h.ssh_key), f"{user}@{h.ssh_host}", "hostname; id -un"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == ["gamma", user]
    assert h.ssh_key.stat().st_mode & 0o777 == 0o600
    r = subprocess.run(["ssh", *SSH_OPTS, "-i", str(h.ssh_key), f"alpha@{h.ssh_host}", "true"], capture_output=True)
    assert r.returncode == 255  # alpha has no account in gamma


def test_up_again_keeps_running_sites_and_replaces_dead_ones(sites):
    provider, handles = sites
    again = {h.name: h for h in provider.up()}
    assert {n: h.extra["init_pid"] for n, h in again.items()} == {n: h.extra["init_pid"] for n, h in handles.items()}
    dead = handles["gamma"].extra["init_pid"]
    os.kill(dead, signal.SIGKILL)
    assert wait_until(lambda: proc_start_time(dead) is None, 5)
    fixed = {h.name: h for h in provider.up()}
    assert fixed["gamma"].extra["init_pid"] != handles["gamma"].extra["init_pid"]
    assert fixed["alpha"].extra["init_pid"] == handles["alpha"].extra["init_pid"]
    assert run(provider, "gamma", ["hostname"])[1].strip() == "gamma"
    handles.update(fixed)


def test_overlapping_subnet_is_refused(sites, tmp_path):
    cfg = load_config(project_file(tmp_path, "fstest-overlap", "10.221.0.0/16", sites=("solo",)))
    with pytest.raises(ConfigError, match=r"provider\.subnet: 10\.221\.0\.0/16 overlaps the host route 10\.221\.0\.0/30"):
        get_provider(cfg).up()
    assert not Path("/srv/fedsim/fstest-overlap").exists()


def _leftovers(project: str, subnet: str, pids: list[int]) -> list[str]:
    prefix = link_prefix(project)
    found = [f"netns {n}" for n in os.listdir("/run/netns") if n.startswith(prefix)] if Path("/run/netns").exists() else []
    found += [f"link {line.split()[0]}" for line in subprocess.run(["ip", "-br", "link"], capture_output=True,
                                                                     text=True).stdout.splitlines() if line.startswith(prefix)]
    found += [f"route {r}" for r in subprocess.run(["ip", "route", "show", "root", subnet], capture_output=True,
                                                    text=True).stdout.splitlines()]
    found += [f"mount {m}" for m in Path("/proc/mounts").read_text().splitlines() if f"/fedsim/{project}" in m]
    found += [f"process {p}" for p in pids if Path(f"/proc/{p}").exists()]
    found += [f"state {p}" for p in Path("/srv/fedsim").glob(f"{project}*")]
    return found


def test_down_from_a_new_process_leaves_nothing_and_twice_is_fine(tmp_path):
    path = project_file(tmp_path, "fstest-down", "10.221.128.0/17", sites=("one", "two"))
    provider = get_provider(load_config(path))
    handles = provider.up()
    provider.up()
    proc = provider.popen("one", ["sleep", "300"], stdout=subprocess.DEVNULL)
    pids = [proc.pid] + [p for h in handles for p in (h.extra["init_pid"], h.extra["unshare_pid"])]
    assert _leftovers("fstest-down", "10.221.128.0/17", pids)  # the check sees what exists
    for _ in range(2):
        r = subprocess.run([sys.executable, "-m", "fedsim_runner", "down", "--config", str(path)],
                           capture_output=True, text=True, cwd=REPO, timeout=60)
        assert r.returncode == 0, r.stderr
    proc.wait(timeout=10)
    # this process is the parent of the sites' unshare: its reaper threads collect them as they end
    wait_until(lambda: not _leftovers("fstest-down", "10.221.128.0/17", pids), 5)
    assert _leftovers("fstest-down", "10.221.128.0/17", pids) == []


def _ssh_project(tmp: Path, name: str, hosts: dict[str, str], key: Path) -> Path:
    path = tmp / f"{name}.toml"
    path.write_text(f'[project]\nname = "{name}"\nworkflow = "mean"\n[provider]\nkind = "ssh"\n' + "".join(
        f'[[sites]]\nname = "{s}"\nfc_user = "{s}@example.org"\ncoordinator = {str(i == 0).lower()}\n'
        f'host = "{host}"\nuser = "{s}"\nssh_key = "{key}"\n' for i, (s, host) in enumerate(hosts.items())))
    return path


def test_ssh_provider_on_namespace_sites(sites, tmp_path):
    ns, handles = sites
    key = handles["alpha"].ssh_key
    ssh = get_provider(load_config(_ssh_project(tmp_path, "fstest-ssh", {n: handles[n].address for n in ("alpha", "beta")}, key)))
    try:
        got = {h.name: h for h in ssh.up()}
        assert {n: (str(h.home), h.gateway, h.user) for n, h in got.items()} == {
            n: (f"/home/{n}", handles[n].gateway, n) for n in ("alpha", "beta")}
        proc = ssh.popen("beta", ["sh", "-c", 'hostname; echo "$FEDSIM_X"; id -un'], env={"FEDSIM_X": "1"},
                         stdout=subprocess.PIPE)
        assert proc.communicate(timeout=30)[0].decode().split() == ["beta", "1", "beta"]
        proc = ssh.popen("alpha", ["sleep", "301"], stdout=subprocess.DEVNULL)
        assert wait_until(lambda: run(ns, "alpha", ["pgrep", "-u", "alpha", "-x", "sleep"])[0] == 0, 10)
        proc.kill()
        proc.wait(timeout=10)
        assert wait_until(lambda: run(ns, "alpha", ["pgrep", "-u", "alpha", "-x", "sleep"])[0] == 1, 10), "remote sleep survived"
    finally:
        ssh.down()
    assert not ssh.state_dir.exists()


def test_ssh_provider_names_an_unreachable_site(sites, tmp_path):
    _, handles = sites
    path = _ssh_project(tmp_path, "fstest-ssh-bad", {"alpha": handles["alpha"].address, "ghost": "10.221.0.254"},
                        handles["alpha"].ssh_key)
    ssh = get_provider(load_config(path))
    with pytest.raises(RunFailed, match=r"site ghost: cannot log in to ghost@10\.221\.0\.254:22 .*check host, port"):
        ssh.up()
    ssh.down()


def test_inventory_of_namespace_sites_uses_the_sites_own_view(sites, tmp_path):
    provider, handles = sites
    hosts = yaml.safe_load(provider.inventory(output=tmp_path / "inventory.yml").read_text())["all"]["children"]["sites"]["hosts"]
    assert {n: (h["ansible_host"], h["ansible_user"], h["fedsim_site_user"], h["fedsim_site_home"], h["fedsim_site_gateway"])
            for n, h in hosts.items()} == {n: (h.address, "root", n, f"/home/{n}", h.gateway) for n, h in handles.items()}
    assert {h["ansible_python_interpreter"] for h in hosts.values()} == {"/usr/bin/python3"}
    # Ansible itself: root over ssh, then become the site user
    r = subprocess.run([str(REPO / ".venv" / "bin" / "ansible"), "-i", str(tmp_path / "inventory.yml"), "sites",
                        "-m", "ansible.builtin.command", "-a", "id -un", "--become", "--become-user",
                        "{{ fedsim_site_user }}", "-o"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(line.split()[0] + ":" + line.split()[-1] for line in r.stdout.splitlines() if " | " in line) == [
        f"{n}:{n}" for n in sorted(handles)]


def test_a_site_named_like_a_host_user_is_a_config_error(tmp_path):
    cfg = load_config(project_file(tmp_path, "fstest-daemon", "10.221.0.0/17", sites=("daemon",)))
    with pytest.raises(ConfigError, match=r"sites\.daemon\.name: 'daemon' is a user on this machine.*rename the site"):
        get_provider(cfg).up()


def test_down_removes_what_an_interrupted_up_left_without_state(tmp_path):
    path = project_file(tmp_path, "fstest-crash", "10.221.128.0/17", sites=("one",))
    provider = get_provider(load_config(path))
    prefix = link_prefix("fstest-crash")
    subprocess.run(["ip", "netns", "add", f"{prefix}-one"], check=True)
    subprocess.run(["ip", "link", "add", f"{prefix}h0", "type", "veth", "peer", "name", "eth0", "netns", f"{prefix}-one"],
                   check=True)
    (provider.state_dir / "one" / "upper").mkdir(parents=True)
    assert _leftovers("fstest-crash", "10.221.128.0/17", [])
    provider.down()
    assert _leftovers("fstest-crash", "10.221.128.0/17", []) == []


def test_a_changed_subnet_moves_the_sites(tmp_path):
    first = project_file(tmp_path, "fstest-move", "10.221.128.0/18", sites=("one",))
    provider = get_provider(load_config(first))
    try:
        old = provider.up()[0]
        moved = get_provider(load_config(project_file(tmp_path, "fstest-move", "10.221.192.0/18", sites=("one",))))
        new = moved.up()[0]
        assert (old.address, new.address) == ("10.221.128.2", "10.221.192.2")
        assert not Path(f"/proc/{old.extra['init_pid']}").exists() or proc_start_time(old.extra["init_pid"]) is None
        routes = subprocess.run(["ip", "route", "show", "root", "10.221.128.0/17"], capture_output=True, text=True).stdout
        assert "10.221.128.0/18" not in routes and "unreachable 10.221.192.0/18" in routes
        moved.down()
    finally:
        provider.down()
    assert _leftovers("fstest-move", "10.221.128.0/17", []) == []


def test_down_can_keep_the_logs(tmp_path):
    path = project_file(tmp_path, "fstest-logs", "10.221.128.0/17", sites=("one",))
    provider = get_provider(load_config(path))
    h = provider.up()[0]
    assert provider.popen("one", ["echo", "kept"]).wait(timeout=30) == 0
    provider.down(keep_logs=True)
    assert (h.logs / "echo.log").read_text() == "kept\n"
    assert not h.home.exists() and provider.handles() == []
    assert [f for f in _leftovers("fstest-logs", "10.221.128.0/17", []) if not f.startswith("state")] == []
    provider.down()
    assert _leftovers("fstest-logs", "10.221.128.0/17", []) == []
