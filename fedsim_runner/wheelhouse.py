"""The wheelhouse sites install Python packages from: sites (and air-gapped hospital VMs) have no internet.

Built on the orchestrator with `pip wheel` from whatever index pip is configured with, pinned to the versions the
orchestrator itself runs (the Dask client, scheduler and workers must match) and, for the FeatureCloud CLI, to the
apps environment. Layout (the roles rely on it):
  *.whl                         every wheel
  fedsim.txt                    `-c fedsim-constraints.txt` + `fedsim==<version>`
  featurecloud.txt              `-c featurecloud-constraints.txt` + `featurecloud==0.1.0`
  playwright.txt                `playwright==<version>`
  fedsim-wheelhouse.json        the stamp: a digest of everything above's inputs; roles ship and install on change
A rebuild happens only when the digest changes (FedSim's sources, pyproject.toml, the pinned versions).

`python -m fedsim_runner.wheelhouse [--dest DIR]` prints the wheelhouse path and "changed" or "unchanged".
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from fedsim_runner.config import REPO_ROOT
from fedsim_runner.errors import RunFailed

STAMP = "fedsim-wheelhouse.json"
FEATURECLOUD_PIN = "featurecloud==0.1.0"
APPS_PYTHON = REPO_ROOT / ".venv-apps" / "bin" / "python"


def default_dest() -> Path:
    """Where the orchestrator keeps its wheelhouse: /opt/fedsim/wheelhouse as root (namespace sites see the host's
    /opt, so nothing needs shipping to them), else the user's cache."""
    if os.geteuid() == 0:
        return Path("/opt/fedsim/wheelhouse")
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedsim" / "wheelhouse"


def _freeze(python: Path | str) -> list[str]:
    """`pip freeze` of an environment, without editable or direct-URL lines (FedSim itself is built from the repo)."""
    out = subprocess.run([str(python), "-m", "pip", "freeze", "--all"], capture_output=True, text=True, check=True)
    keep = []
    for line in out.stdout.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "-e")) or " @ " in line:
            continue
        name = line.split("==")[0].lower()
        if name in ("fedsim", "pip", "setuptools", "wheel"):
            continue
        keep.append(line)
    return sorted(keep, key=str.lower)


def _sources_digest() -> str:
    """FedSim's own sources and packaging: a change means a new fedsim wheel."""
    h = hashlib.sha256()
    files = [REPO_ROOT / "pyproject.toml"] + sorted(
        p for p in (REPO_ROOT / "fedsim_runner").rglob("*") if p.is_file() and "__pycache__" not in p.parts
    )
    for p in files:
        h.update(str(p.relative_to(REPO_ROOT)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def _version(pins: list[str], name: str) -> str | None:
    return next((p.split("==", 1)[1] for p in pins if p.lower().startswith(f"{name}==")), None)


def _pip(args: list[str], what: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RunFailed(f"wheelhouse: pip could not get {what}: {tail[0]}; check pip's index settings (pip config list)")


def plan(python: Path | str = sys.executable, apps_python: Path | str = APPS_PYTHON) -> dict:
    """What the wheelhouse must contain, and its digest."""
    fedsim_pins = _freeze(python)
    fc_pins = _freeze(apps_python) if Path(apps_python).exists() else []
    fedsim_version = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('fedsim'))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    doc = {
        "fedsim": fedsim_version,
        "fedsim_constraints": fedsim_pins,
        "featurecloud_constraints": [p for p in fc_pins if not p.lower().startswith("featurecloud==")],
        "playwright": _version(fedsim_pins, "playwright"),
        "sources": _sources_digest(),
    }
    doc["digest"] = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
    return doc


def build_wheelhouse(dest: Path | str | None = None) -> tuple[Path, bool]:
    """Build (or keep) the wheelhouse at `dest`; returns (path, changed)."""
    dest = Path(dest) if dest else default_dest()
    doc = plan()
    try:
        if json.loads((dest / STAMP).read_text()).get("digest") == doc["digest"]:
            return dest, False
    except (OSError, ValueError):
        pass
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".wheelhouse-", dir=dest.parent))
    try:
        (work / "fedsim-constraints.txt").write_text("\n".join(doc["fedsim_constraints"]) + "\n")
        (work / "featurecloud-constraints.txt").write_text("\n".join(doc["featurecloud_constraints"]) + "\n")
        (work / "fedsim.txt").write_text(f"-c fedsim-constraints.txt\nfedsim=={doc['fedsim']}\n")
        (work / "featurecloud.txt").write_text(f"-c featurecloud-constraints.txt\n{FEATURECLOUD_PIN}\n")
        playwright = f"playwright=={doc['playwright']}" if doc["playwright"] else "playwright"
        (work / "playwright.txt").write_text(playwright + "\n")
        # the constraints are the orchestrator's exact versions; pip's cache makes a rebuild cheap
        _pip(["wheel", "-q", "-w", str(work), "-c", str(work / "fedsim-constraints.txt"), str(REPO_ROOT)],
             "FedSim and its dependencies")
        _pip(["wheel", "-q", "-w", str(work), "-c", str(work / "featurecloud-constraints.txt"), FEATURECLOUD_PIN],
             FEATURECLOUD_PIN)
        _pip(["wheel", "-q", "-w", str(work), playwright], playwright)
        for p in work.iterdir():
            p.chmod(0o644)
        work.chmod(0o755)
        (work / STAMP).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        (work / STAMP).chmod(0o644)
        if dest.exists():
            shutil.rmtree(dest)
        work.rename(dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest, True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedsim_runner.wheelhouse", description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=None, help=f"the wheelhouse folder (default {default_dest()})")
    args = parser.parse_args(argv)
    try:
        path, changed = build_wheelhouse(args.dest)
    except RunFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    print("changed" if changed else "unchanged")
    return 0


if __name__ == "__main__":
    sys.exit(main())
