"""Bringing sites up and down: 3, 8 and 16 namespace sites (root), and process sites for comparison.

Per size: `up` (netns + veth, overlays, user, sshd accepting connections), `up` again (idempotent, all alive), the
memory the sites hold (PSS of each site's unshare, init and sshd), and `down` (nothing left). Median of REPEAT runs.
Run alone: `.venv/bin/python bench/bench_sites.py` → bench/results/sites.json.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fedsim_runner.config import load_config  # noqa: E402
from fedsim_runner.sites import get_provider, namespace_supported  # noqa: E402

SIZES = (3, 8, 16)
REPEAT = 3
SUBNET = "10.221.0.0/16"  # the sites tests' range; run the benchmark when they are not running


def project(folder: Path, n: int, isolation: str) -> Path:
    path = folder / f"bench-{isolation}-{n}.toml"
    path.write_text(f'[project]\nname = "fsbench-sites"\nworkflow = "mean"\n[provider]\nisolation = "{isolation}"\n'
                    f'subnet = "{SUBNET}"\n' + "".join(
                        f'[[sites]]\nname = "s{i}"\nfc_user = "s{i}@example.org"\ncoordinator = {str(i == 0).lower()}\n'
                        for i in range(n)))
    return path


def pss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def site_pids(h) -> list[int]:
    init = h.extra["init_pid"]
    children = Path(f"/proc/{init}/task/{init}/children").read_text().split()
    return [h.extra["unshare_pid"], init, *map(int, children)]


def measure(folder: Path, n: int, isolation: str) -> dict:
    provider = get_provider(load_config(project(folder, n, isolation)))
    ups, agains, downs, mems = [], [], [], []
    for _ in range(REPEAT):
        t = time.perf_counter()
        handles = provider.up()
        ups.append(time.perf_counter() - t)
        t = time.perf_counter()
        provider.up()
        agains.append(time.perf_counter() - t)
        if isolation == "namespace":
            mems.append(pss_mb([p for h in handles for p in site_pids(h)]) / n)
        t = time.perf_counter()
        provider.down()
        downs.append(time.perf_counter() - t)
    result = {"sites": n, "up_s": statistics.median(ups), "up_again_s": statistics.median(agains),
              "down_s": statistics.median(downs), "runs": REPEAT}
    if mems:
        result["pss_mb_per_site"] = round(statistics.median(mems), 2)
    return result


def main() -> None:
    results: dict = {"machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "load_at_start": os.getloadavg()[0]},
                     "namespace": {}, "process": {}}
    with tempfile.TemporaryDirectory() as tmp:
        kinds = ["namespace", "process"] if namespace_supported() else ["process"]
        if "namespace" not in kinds:
            results["namespace"] = {"skipped": "needs root, overlayfs, iproute2, util-linux and openssh-server"}
        for kind in kinds:
            for n in SIZES:
                r = measure(Path(tmp), n, kind)
                results[kind][str(n)] = r
                print(f"{kind:9} {n:2} sites: up {r['up_s']:.3f} s, again {r['up_again_s']:.3f} s, "
                      f"down {r['down_s']:.3f} s" + (f", {r['pss_mb_per_site']} MB/site" if "pss_mb_per_site" in r else ""))
    out = REPO / "bench" / "results" / "sites.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if out.exists() else {}
    previous.update(results)  # keep what other benchmarks add to this file (provisioning times)
    out.write_text(json.dumps(previous, indent=1) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
