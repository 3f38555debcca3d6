"""Process sites (no root needed): own folders, environment and ports per site; down stops what popen started."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedsim_runner.backoff import wait_until
from fedsim_runner.config import load_config
from fedsim_runner.sites import get_provider, namespace_supported
from fedsim_runner.sites.base import PORTS_PER_SITE
from fedsim_runner.sites.process import ProcessProvider
from tests.conftest import REPO

pytestmark = pytest.mark.e2e


def project_file(tmp: Path, name: str, isolation: str = "process") -> Path:
    path = tmp / f"{name}.toml"
    path.write_text(f'[project]\nname = "{name}"\nworkflow = "mean"\n[provider]\nisolation = "{isolation}"\n'
                    + "".join(f'[[sites]]\nname = "{s}"\nfc_user = "{s}@example.org"\ncoordinator = {str(s == "p1").lower()}\n'
                              for s in ("p1", "p2", "p3")))
    return path


@pytest.fixture
def provider(tmp_path):
    p = get_provider(load_config(project_file(tmp_path, "fstest-proc")))
    yield p
    p.down()


def test_up_gives_each_site_its_folders_and_ports(provider):
    assert isinstance(provider, ProcessProvider)
    handles = provider.up()
    assert [h.name for h in handles] == ["p1", "p2", "p3"]
    bases = [h.port_base for h in handles]
    assert len(set(bases)) == 3 and all(abs(a - b) >= PORTS_PER_SITE for a in bases for b in bases if a != b)
    for h in handles:
        assert h.home.is_dir() and h.home.stat().st_mode & 0o777 == 0o700
        assert (h.home.parent / "data").is_dir() and h.logs.is_dir()
        assert (h.address, h.gateway, h.ssh_host) == ("127.0.0.1", "127.0.0.1", None)
    assert len({h.home for h in handles}) == 3
    again = get_provider(provider.cfg)  # a new provider (e.g. another process) finds the same sites
    assert again.up() == handles == again.handles()


def test_popen_has_exactly_the_given_environment_in_the_site_home(provider):
    h = provider.up()[1]
    proc = provider.popen("p2", ["env"], env={"FEDSIM_X": "1"}, stdout=subprocess.PIPE)
    env = dict(line.split("=", 1) for line in proc.communicate(timeout=30)[0].decode().splitlines())
    assert set(env) == {"FEDSIM_X", "PATH", "HOME", "USER"} and env["HOME"] == str(h.home)
    proc = provider.popen("p2", ["pwd"], stdout=subprocess.PIPE)
    assert proc.communicate(timeout=30)[0].decode().strip() == str(h.home)
    proc = provider.popen("p2", ["sh", "-c", "echo to-the-log"], env={})
    assert proc.wait(timeout=30) == 0
    assert (h.logs / "sh.log").read_text() == "to-the-log\n"


def test_down_from_a_new_process_stops_site_processes_and_removes_everything(provider, tmp_path):
    handles = provider.up()
    proc = provider.popen("p3", ["sh", "-c", "sleep 300 & wait"], env={})
    child = wait_until(lambda: Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split(), 5)
    assert child
    for _ in range(2):
        r = subprocess.run([sys.executable, "-m", "fedsim_runner", "down", "--config", str(provider.cfg.path)],
                           capture_output=True, text=True, cwd=REPO, timeout=60)
        assert r.returncode == 0, r.stderr
    assert proc.wait(timeout=10) is not None
    assert wait_until(lambda: not Path(f"/proc/{child[0]}").exists(), 5), "the sleep in the site survived down"
    assert not any(h.home.exists() for h in handles) and not provider.state_dir.exists()
    assert provider.handles() == []


def test_auto_picks_namespace_exactly_when_it_can(tmp_path):
    p = get_provider(load_config(project_file(tmp_path, "fstest-auto", isolation="auto")))
    assert p.kind == ("namespace" if namespace_supported() else "process")
    assert namespace_supported() == (os.geteuid() == 0 and Path("/usr/sbin/sshd").exists()
                                     and "overlay" in Path("/proc/filesystems").read_text())
