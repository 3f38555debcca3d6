"""Provisioning benchmark: bring up N namespace sites and provision them with site.yml (first run and the idempotent
re-run), then distribute.yml, for N in 3, 8, 16 (or the sizes given as arguments). Needs root.
Writes bench/results/provision.json. Range 10.225.0.0/16."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fedsim_runner.ansible import run_playbook  # noqa: E402
from fedsim_runner.config import load_config  # noqa: E402
from fedsim_runner.sites import get_provider  # noqa: E402
from fedsim_runner.wheelhouse import build_wheelhouse  # noqa: E402

OUT = REPO / "bench" / "results" / "provision.json"


def project(tmp: Path, n: int) -> Path:
    sites = "".join(f'[[sites]]\nname = "b{i}"\nfc_user = "b{i}@example.org"\ncoordinator = {str(i == 0).lower()}\n'
                    for i in range(n))
    path = tmp / f"bench{n}.toml"
    path.write_text(f'[project]\nname = "fedsim-bench-prov{n}"\nworkflow = "mean"\n'
                    f'[provider]\nisolation = "namespace"\nsubnet = "10.225.0.0/16"\n' + sites)
    return path


def timed(fn):
    t = time.perf_counter()
    result = fn()
    return time.perf_counter() - t, result


def bench(n: int, tmp: Path) -> dict:
    cfg = load_config(project(tmp, n))
    provider = get_provider(cfg)
    try:
        up, handles = timed(provider.up)
        inventory = provider.inventory(output=tmp / f"inventory{n}.yml")
        first, s1 = timed(lambda: run_playbook("site.yml", inventory))
        again, s2 = timed(lambda: run_playbook("site.yml", inventory))
        creds = {"fedsim_credentials": {s.fc_user: f"pw-{s.name}" for s in cfg.sites}}
        dist, _ = timed(lambda: run_playbook("distribute.yml", inventory, secrets=creds))
        dist2, d2 = timed(lambda: run_playbook("distribute.yml", inventory, secrets=creds))
    finally:
        down, _ = timed(provider.down)
    return {"sites": n, "up_s": round(up, 3), "provision_s": round(first, 2), "provision_rerun_s": round(again, 2),
            "rerun_changed": sum(s2["changed"].values()), "distribute_s": round(dist, 2),
            "distribute_rerun_s": round(dist2, 2), "distribute_rerun_changed": sum(d2["changed"].values()),
            "down_s": round(down, 3)}


def main() -> None:
    if os.geteuid() != 0:
        print("bench_provision: needs root (namespace sites); skipped")
        return
    sizes = [int(a) for a in sys.argv[1:]] or [3, 8, 16]
    wheelhouse_s, (_, changed) = timed(build_wheelhouse)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            rows.append(bench(n, Path(tmp)))
            print(json.dumps(rows[-1]))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"wheelhouse_s": round(wheelhouse_s, 2), "wheelhouse_rebuilt": changed,
                               "cpus": os.cpu_count(), "runs": rows}, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
