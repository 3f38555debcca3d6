"""The Ansible side: ansible-lint (profile production) and the syntax check pass; run_playbook runs a real
ansible-runner with a fresh private dir that is gone afterwards, keeps secrets out of the log, and turns a failure into
a RunFailed naming the host and the task."""

from __future__ import annotations

import os
import subprocess
import tempfile
import textwrap
from pathlib import Path

import pytest
import yaml

from fedsim_runner.ansible import run_playbook
from fedsim_runner.errors import ConfigError, RunFailed
from fedsim_runner.runlog import RunDir
from tests.conftest import REPO

VENV_BIN = REPO / ".venv" / "bin"
ENV = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "ANSIBLE_CONFIG": str(REPO / "ansible.cfg")}
SECRET = "s3cr3t-'$-pass"


def test_ansible_lint_production_profile_passes():
    proc = subprocess.run([str(VENV_BIN / "ansible-lint"), "--offline", "--nocolor"], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "production" in proc.stderr + proc.stdout


@pytest.mark.parametrize("playbook", ["site.yml", *sorted(p.relative_to(REPO).as_posix()
                                                         for p in (REPO / "playbooks").glob("*.yml"))])
def test_syntax_check(playbook):
    proc = subprocess.run([str(VENV_BIN / "ansible-playbook"), "--syntax-check", playbook], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_every_role_follows_the_house_rules():
    for role in sorted((REPO / "roles").iterdir()):
        assert role.name.startswith("fedsim_")
        specs = yaml.safe_load((role / "meta" / "argument_specs.yml").read_text())["argument_specs"]["main"]["options"]
        defaults = yaml.safe_load((role / "defaults" / "main.yml").read_text())
        assert set(defaults) <= set(specs), f"{role.name}: defaults without argument spec"
        assert all(k.startswith(f"{role.name}_") for k in defaults), role.name
        tasks = "".join(p.read_text() for p in (role / "tasks").glob("*.yml"))
        assert "ansible.builtin.assert" in tasks, f"{role.name}: no preflight asserts"


def _inventory(tmp: Path) -> Path:
    inv = tmp / "inventory.yml"
    inv.write_text(yaml.safe_dump({"all": {"children": {"sites": {"hosts": {"here": {
        "ansible_connection": "local", "ansible_python_interpreter": str(VENV_BIN / "python")}}}}}}))
    return inv


def _playbook(tmp: Path, failing: bool) -> Path:
    pb = tmp / "pb.yml"
    pb.write_text(textwrap.dedent(f"""\
        - name: Try
          hosts: sites
          gather_facts: false
          tasks:
            - name: Use the secret
              ansible.builtin.copy:
                content: "{{{{ fedsim_secret }}}}"
                dest: "{tmp}/secret.txt"
                mode: "0600"
              no_log: true
            - name: Check the answer
              ansible.builtin.assert:
                that: {'false' if failing else 'true'}
                fail_msg: the answer is wrong
        """))
    return pb


def _private_dirs() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("fedsim-ansible-*"))


def test_run_playbook_success_secret_only_where_the_playbook_put_it(tmp_path):
    before = _private_dirs()
    with RunDir.create(tmp_path / "runs", "test") as run:
        stats = run_playbook(_playbook(tmp_path, failing=False), _inventory(tmp_path), {"x": 1}, run_log=run,
                             secrets={"fedsim_secret": SECRET})
    assert stats["changed"] == {"here": 1}
    assert (tmp_path / "secret.txt").read_text() == SECRET
    assert _private_dirs() == before
    log = (run.path / "fedsim.log").read_text()
    assert "ansible pb: successful" in log and "Use the secret" in log
    for p in run.path.rglob("*"):
        assert not p.is_file() or SECRET not in p.read_text(errors="replace")


def test_run_playbook_failure_names_host_and_task(tmp_path):
    before = _private_dirs()
    with pytest.raises(RunFailed, match=r"pb failed on here at task 'Check the answer': failed: the answer is wrong"):
        run_playbook(_playbook(tmp_path, failing=True), _inventory(tmp_path), secrets={"fedsim_secret": SECRET})
    assert _private_dirs() == before


def test_missing_playbook_and_inventory_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="playbook nope.yml: not found"):
        run_playbook("nope.yml", _inventory(tmp_path))
    with pytest.raises(ConfigError, match="no inventory"):
        run_playbook("distribute.yml", tmp_path / "missing.yml")
