"""Costs of the foundation: CLI start-up, validation, inventory generation, logging with redaction, phase bookkeeping.

Run alone: `.venv/bin/python bench/bench_foundation.py` → bench/results/foundation.json.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fedsim_runner.config import parse_config  # noqa: E402
from fedsim_runner.inventory import build_inventory  # noqa: E402
from fedsim_runner.runlog import Redactor, RunDir  # noqa: E402

PY = str(REPO / ".venv" / "bin" / "python")


def cli_seconds(*args: str, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        subprocess.run([PY, "-m", "fedsim_runner", *args], capture_output=True, check=True, cwd=REPO)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def ssh_project(n_sites: int, folder: Path):
    text = '[project]\nname = "b"\nworkflow = "svd"\n[provider]\nkind = "ssh"\n'
    for i in range(n_sites):
        text += (f'[[sites]]\nname = "s{i}"\nfc_user = "s{i}@x.org"\nhost = "10.9.{i // 250}.{i % 250 + 1}"\n'
                 f'user = "debian"\n' + ("coordinator = true\n" if i == 0 else ""))
    path = folder / f"p{n_sites}.toml"
    path.write_text(text)
    return text, path


def per_call(fn, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def main() -> None:
    results: dict[str, float] = {
        "cli_help_s": cli_seconds("--help"),
        "cli_validate_default_svd_s": cli_seconds("validate", "resources/config_svd.toml"),
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for n in (3, 100):
            text, path = ssh_project(n, folder)
            results[f"parse_config_{n}_sites_ms"] = per_call(lambda t=text, p=path: parse_config(t, p), 50) * 1e3
            cfg = parse_config(text, path)
            results[f"build_inventory_{n}_sites_ms"] = per_call(lambda c=cfg: build_inventory(c), 50) * 1e3

        redactor = Redactor(f"secret-password-{i}" for i in range(30))
        line = "2026-12-04T12:00:00Z INFO controller: polled hub, project 12 running, nothing secret here " * 2
        results["redact_line_us"] = per_call(lambda: redactor.redact(line), 20000) * 1e6
        with RunDir.create(folder / "runs", "svd", redactor) as run:
            results["log_record_us"] = per_call(lambda: run.log.info("record %s", line), 20000) * 1e6

            def phase():
                with run.phase("p"):
                    pass

            results["phase_overhead_ms"] = per_call(phase, 500) * 1e3
    out = REPO / "bench" / "results" / "foundation.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({k: round(v, 4) for k, v in results.items()}, indent=2) + "\n")
    for k, v in results.items():
        print(f"{k:32} {v:10.4f}")


if __name__ == "__main__":
    main()
