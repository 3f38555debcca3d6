"""The Vagrantfile and the vagrant provider as far as this machine allows: `vagrant validate` on a sample project
file, and handles + inventory from recorded `vagrant ssh-config` output (no VM can boot here)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from fedsim_runner.config import load_config
from fedsim_runner.errors import RunFailed
from fedsim_runner.sites import get_provider
from fedsim_runner.sites.vagrant import VagrantProvider
from tests.conftest import REPO

SAMPLE = REPO / "tests" / "data" / "vagrant-project.toml"
SSH_CONFIG = REPO / "tests" / "data" / "vagrant-ssh-config"
needs_vagrant = pytest.mark.skipif(shutil.which("vagrant") is None, reason="needs vagrant (`make system` installs it)")


def vagrant(tmp_path, project, *args):
    env = {**os.environ, "FEDSIM_CONFIG": str(project), "VAGRANT_DOTFILE_PATH": str(tmp_path / "dot"),
           "FEDSIM_PYTHON": sys.executable}
    return subprocess.run(["vagrant", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


@needs_vagrant
def test_vagrantfile_validates_with_a_sample_project(tmp_path):
    r = vagrant(tmp_path, SAMPLE, "validate")
    assert r.returncode == 0, r.stderr
    assert "validated successfully" in r.stdout


@needs_vagrant
def test_vagrantfile_refuses_a_project_of_another_kind_in_one_line(tmp_path):
    r = vagrant(tmp_path, REPO / "resources" / "config_mean.toml", "validate")
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0
    assert 'provider.kind: the Vagrantfile needs kind = "vagrant"' in r.stderr


def test_vagrantfile_settings_come_from_the_project_file():
    r = subprocess.run([sys.executable, "-m", "fedsim_runner.sites.vagrant", str(SAMPLE)], capture_output=True,
                       text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {
        "project": "fstest-vagrant", "box": "debian/bookworm64", "vm_provider": "libvirt", "memory": 1024, "cpus": 1,
        "sites": [{"name": f"site{i}", "address": f"192.168.56.1{i}"} for i in (1, 2, 3)]}


def test_handles_and_inventory_from_recorded_ssh_config(tmp_path):
    provider = get_provider(load_config(SAMPLE))
    assert isinstance(provider, VagrantProvider)
    handles = provider.handles_from_ssh_config(SSH_CONFIG)
    assert [(h.name, h.ssh_host, h.ssh_port, h.ssh_user, h.address, h.gateway) for h in handles] == [
        ("site1", "127.0.0.1", 2222, "vagrant", "192.168.56.11", "192.168.56.1"),
        ("site2", "127.0.0.1", 2200, "vagrant", "192.168.56.12", "192.168.56.1"),
        ("site3", "127.0.0.1", 2201, "vagrant", "192.168.56.13", "192.168.56.1"),
    ]
    assert str(handles[0].ssh_key) == "/home/researcher/fed study/.vagrant/machines/site1/libvirt/private_key"
    provider.state_dir.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copy(SSH_CONFIG, provider.ssh_config)  # what `up` saves after `vagrant up`
        inventory = yaml.safe_load(provider.inventory(output=tmp_path / "inventory.yml").read_text())
        hosts = inventory["all"]["children"]["sites"]["hosts"]
        assert {n: (h["ansible_port"], h["fedsim_site_address"]) for n, h in hosts.items()} == {
            "site1": (2222, "192.168.56.11"), "site2": (2200, "192.168.56.12"), "site3": (2201, "192.168.56.13")}
    finally:
        provider.down()  # no VM was made: down only removes the state
    assert not provider.state_dir.exists()


def test_a_site_without_a_vm_is_named(tmp_path):
    recorded = tmp_path / "ssh-config"
    recorded.write_text(SSH_CONFIG.read_text().split("Host site2")[0])
    with pytest.raises(RunFailed, match=r"site site2: no VM in `vagrant ssh-config`"):
        get_provider(load_config(SAMPLE)).handles_from_ssh_config(recorded)
