"""`molecule test` on 3 namespace sites (root): create → converge (site.yml) → idempotence (changed=0) → verify →
destroy. Long (minutes): marked e2e. Range 10.222.0.0/16 (molecule/default/project.toml)."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from tests.conftest import REPO, needs_root

pytestmark = [needs_root, pytest.mark.e2e, pytest.mark.root]


@pytest.mark.timeout(1800)
def test_molecule_default_scenario():
    env = {**os.environ, "PATH": f"{REPO / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}", "NO_COLOR": "1"}
    proc = subprocess.run([str(REPO / ".venv" / "bin" / "molecule"), "test"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1700)
    out = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout + proc.stderr)
    assert proc.returncode == 0, out[-4000:]
    for step in ("create", "converge", "idempotence", "verify", "destroy"):
        assert f"{step}: Executed: Successful" in out, f"molecule did not finish {step}: {out[-2000:]}"
