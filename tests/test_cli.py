"""The command line as a user meets it: help, usage errors (exit 2), init → validate → inventory end to end."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from tests.test_config import CREDS, PY, run_cli
from tests.test_inventory import SSH_CONFIG

COMMANDS = ["svd", "mean", "init", "validate", "inventory", "up", "provision", "down", "hub", "controller", "logs"]


def test_help_lists_every_command():
    r = run_cli("--help")
    assert r.returncode == 0
    for command in COMMANDS:
        assert f"    {command}" in r.stdout, command
    for command in COMMANDS:
        sub = run_cli(command, "--help")
        assert sub.returncode == 0 and "usage: fedsim" in sub.stdout, (command, sub.stderr)


@pytest.mark.parametrize("args", [[], ["frobnicate"], ["validate"], ["init", "--workflow", "pca"],
                                  ["inventory"], ["svd", "--isolation", "vm"], ["logs", "run", "--nope"]])
def test_usage_errors_exit_2(args):
    r = run_cli(*args)
    assert r.returncode == 2 and "usage: fedsim" in r.stderr and "Traceback" not in r.stderr


def test_console_script_is_installed():
    fedsim = PY.replace("/python", "/fedsim")
    r = subprocess.run([fedsim, "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "init" in r.stdout


@pytest.mark.parametrize("workflow", ["svd", "mean"])
def test_init_validate_end_to_end(tmp_path, workflow):
    r = run_cli("init", "--workflow", workflow)
    assert r.returncode == 0 and r.stdout.startswith("# FedSim project file")
    path = tmp_path / "my.toml"
    path.write_text(r.stdout)
    creds = tmp_path / "creds.env"
    creds.write_text(CREDS)
    r = run_cli("validate", str(path), "--credentials", str(creds), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"workflow {workflow}, 3 sites, coordinator site1" in r.stderr
    assert "credentials for every site" in r.stderr
    for pw in ("pw-one-11", "pw-two-22", "pw-three-33"):
        assert pw not in r.stderr + r.stdout


def test_validate_notes_credentials_that_a_local_run_creates(tmp_path):
    r = run_cli("init", "--workflow", "svd")
    path = tmp_path / "my.toml"
    path.write_text(r.stdout.replace('# credentials = "secrets.env"', 'credentials = "secrets.env"'))
    r = run_cli("validate", str(path))
    assert r.returncode == 0 and "will be created with random passwords" in r.stderr
    assert not (tmp_path / "secrets.env").exists()  # validate only checks
    path.write_text(path.read_text().replace('platform = "local"', 'platform = "featurecloud"'))
    r = run_cli("validate", str(path))
    assert r.returncode == 2 and "credentials file missing" in r.stderr and "Traceback" not in r.stderr


def test_init_template_to_vagrant_inventory(tmp_path):
    """The template's commented vagrant variant, switched on, gives a working inventory."""
    text = run_cli("init", "--workflow", "svd").stdout
    path = tmp_path / "vagrant.toml"
    path.write_text(text.replace('kind = "local"', 'kind = "vagrant"'))
    r = run_cli("validate", str(path))  # a half-done switch names the leftover option
    assert r.returncode == 2 and 'provider.isolation: unknown key; it belongs to kind = "local"' in r.stderr
    text = text.replace('kind = "local"', 'kind = "vagrant"').replace('isolation = "auto"', "# isolation")
    for i in (1, 2, 3):
        text = text.replace(f'fc_user = "site{i}@fedsim.local"\n',
                            f'fc_user = "site{i}@fedsim.local"\naddress = "192.168.56.1{i}"\n')
    path.write_text(text)
    out = tmp_path / "inventory.yml"
    r = run_cli("inventory", "--config", str(path), "--vagrant-ssh-config", str(SSH_CONFIG), "--output", str(out))
    assert r.returncode == 0, r.stderr
    hosts = yaml.safe_load(out.read_text())["all"]["children"]["sites"]["hosts"]
    assert {h: (v["ansible_port"], v["fedsim_site_address"]) for h, v in hosts.items()} == {
        "site1": (2222, "192.168.56.11"), "site2": (2200, "192.168.56.12"), "site3": (2201, "192.168.56.13")}
