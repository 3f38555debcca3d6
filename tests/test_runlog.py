"""The run directory: unique folders, phase metrics (also on failure), one log, and no secret in any file."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedsim_runner.config import load_credentials, parse_config
from fedsim_runner.errors import ConfigError, RunFailed
from fedsim_runner.inventory import write_inventory
from fedsim_runner.runlog import Redactor, RunDir, show_logs
from tests.test_config import run_cli
from tests.test_inventory import SSH_CONFIG, VAGRANT_SITES, project

# passwords with characters that URLs and JSON escape
SECRETS = {"site1@fedsim.local": "Tr0ub4dor&3", "site2@fedsim.local": 'q"uote\\back', "site3@fedsim.local": "sp ace/+%"}


def credentials(tmp_path: Path):
    path = project(tmp_path, 'kind = "vagrant"', VAGRANT_SITES)
    (tmp_path / "creds.env").write_text(
        "".join(f"{user}='{pw}'\n" for user, pw in SECRETS.items() if "'" not in pw)
    )
    cfg = parse_config(path.read_text(), path)
    creds = load_credentials(cfg)
    assert creds == SECRETS  # the file says what we think it says
    return cfg, creds


def test_run_dirs_are_unique_and_named_by_utc_time_and_workflow(tmp_path):
    runs = [RunDir.create(tmp_path / "runs", "svd") for _ in range(3)]  # same second, most likely
    try:
        names = [r.path.name for r in runs]
        assert len(set(names)) == 3
        assert all(re.fullmatch(r"\d{8}T\d{6}Z-svd(-\d+)?", n) for n in names)
        assert all((r.path / "fedsim.log").is_file() for r in runs)
    finally:
        for r in runs:
            r.close()
    with pytest.raises(ConfigError, match="folder name"):
        RunDir.create(tmp_path, "../svd")


def test_phases_record_wall_cpu_memory_and_survive_failures(tmp_path):
    with pytest.raises(RunFailed), RunDir.create(tmp_path, "mean") as run:
        with run.phase("compute"):
            end = time.process_time() + 0.2
            while time.process_time() < end:  # burn CPU in this process
                pass
        with run.phase("children"):
            subprocess.run([sys.executable, "-c", "import time\nt=time.process_time()+0.2\n"
                            "while time.process_time()<t: pass"], check=True)
        with run.phase("upload", site="site2"):
            pass
        run.record_site_step("site1", "join", 0.25)
        run.add_metric("rounds", 3)
        with run.phase("run"):
            raise RunFailed("site site2: upload failed")
    metrics = json.loads((run.path / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "site site2: upload failed" in metrics["error"]
    phases = {p["name"]: p for p in metrics["phases"]}
    assert list(phases) == ["compute", "children", "run"]
    assert phases["compute"]["cpu"] >= 0.15 and phases["children"]["cpu"] >= 0.15  # children's CPU counted
    assert phases["run"]["status"] == "failed" and "upload failed" in phases["run"]["error"]
    for p in phases.values():
        assert p["wall"] >= 0 and p["end"] >= p["start"] and p["peak_rss"] > 10 * 2**20
    assert metrics["sites"]["site2"]["steps"][0]["name"] == "upload"
    step = metrics["sites"]["site1"]["steps"][0]
    assert step["name"] == "join" and step["wall"] == 0.25 and abs(step["end"] - step["start"] - 0.25) < 1e-6
    assert metrics["rounds"] == 3
    log = (run.path / "fedsim.log").read_text()
    assert "phase run failed" in log and "run failed: site site2: upload failed" in log


def test_interrupt_is_recorded_and_handlers_are_closed(tmp_path):
    before = list(logging.getLogger().handlers)
    levels = [logging.getLogger(n).level for n in ("fedsim", "fedsim_runner")]
    with pytest.raises(KeyboardInterrupt), RunDir.create(tmp_path, "svd") as run:
        with run.phase("wait"):
            raise KeyboardInterrupt
    metrics = json.loads((run.path / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and metrics["phases"][0]["status"] == "interrupted"
    assert logging.getLogger().handlers == before
    assert [logging.getLogger(n).level for n in ("fedsim", "fedsim_runner")] == levels
    assert not any(run.redactor in h.filters for h in logging.getLogger().handlers)


def test_no_secret_reaches_log_metrics_files_or_inventory(tmp_path):
    cfg, creds = credentials(tmp_path)
    console = io.StringIO()
    console_handler = logging.StreamHandler(console)  # e.g. the CLI's console: it gets the redactor too
    logging.getLogger().addHandler(console_handler)
    try:
        with pytest.raises(RuntimeError), RunDir.create(tmp_path / "runs", "svd") as run:
            run.add_secrets(creds.values())
            pw1, pw2, pw3 = creds.values()
            run.log.info(f"logged directly: {pw1}")
            run.log.info("logged as argument: %s / %r", pw2, pw2)
            logging.getLogger("fedsim.cluster").warning("another FedSim module: %s", pw3)
            logging.getLogger("fedsim_runner.sites").debug("a debug record %s", pw1)
            logging.getLogger("httpx").warning("third party: https://h/login?password=%s", pw3)
            logging.getLogger("json").error("in JSON: %s", json.dumps({"password": pw2}))
            try:
                raise ValueError(f"login failed for password {pw1}")
            except ValueError:
                run.log.exception("exception text")
            run.append_site_log("site2", "controller.log", f"line one\nsecret line {pw2}\n")
            run.add_metric("note", f"contains {pw1}")
            run.write_text("resolved-config.txt", f"password = {pw3}\n")
            run.write_json("state.json", {"token": pw2})
            write_inventory(cfg, output=run.path / "inventory.yml", vagrant_ssh_config=SSH_CONFIG)
            with run.phase("login"):
                raise RuntimeError(f"wrong password {pw1}")
    finally:
        logging.getLogger().removeHandler(console_handler)
    files = {p.name: p.read_text() for p in run.path.rglob("*") if p.is_file()}
    assert set(files) >= {"fedsim.log", "metrics.json", "inventory.yml", "resolved-config.txt", "state.json"}
    for name, text in {**files, "console": console.getvalue()}.items():
        for pw in creds.values():
            for form in (pw, json.dumps(pw)[1:-1]):
                assert form not in text, (name, pw)
    log = files["fedsim.log"]
    assert log.count("***") >= 8 and "ValueError: login failed for password ***" in log
    assert "[site2/controller.log] secret line ***" in log and "[site2/controller.log] line one" in log
    assert "another FedSim module: ***" in log and "third party: https://h/login?password=***" in log
    assert "a debug record ***" in log
    metrics = json.loads(files["metrics.json"])
    assert metrics["note"] == "contains ***" and metrics["error"] == "RuntimeError: wrong password ***"
    assert "***" in console.getvalue()


def test_redactor_masks_longest_secret_first_and_url_forms():
    r = Redactor(["abc", "abcdef"])
    r.add_secret("")  # ignored
    r.add_secret("a b&c")
    assert r.redact("x abcdef y abc z") == "x *** y *** z"
    assert r.redact("q=a+b%26c and a%20b%26c") == "q=*** and ***"
    assert r.redact("nothing here") == "nothing here"


def make_run(tmp_path: Path) -> Path:
    with RunDir.create(tmp_path / "runs", "svd") as run:
        run.log.info("orchestrator starts site1 and site2")
        run.log.info("hub ready")
        run.append_site_log("site1", "worker", "worker connected\nERROR boom")
    logs = run.path / "sites" / "site2" / "logs"
    logs.mkdir(parents=True)
    (logs / "controller.log").write_text("controller up\nERROR app failed\n")
    (run.path / "sites" / "site1" / "logs").mkdir(parents=True)
    return run.path


def test_show_logs_filters_by_site_and_grep(tmp_path):
    path = make_run(tmp_path)
    out = io.StringIO()
    assert show_logs(path, out=out) == 0
    text = out.getvalue()
    assert "hub ready" in text and "[site2/controller.log] ERROR app failed" in text

    out = io.StringIO()
    show_logs(path, site="site2", grep="error", out=out)
    assert out.getvalue().splitlines() == ["[site2/controller.log] ERROR app failed"]

    out = io.StringIO()
    show_logs(path, site="site1", out=out)
    text = out.getvalue()
    assert "worker connected" in text and "hub ready" not in text and "controller up" not in text

    with pytest.raises(ConfigError, match="no such site"):
        show_logs(path, site="site9")
    with pytest.raises(ConfigError, match="not a regular expression"):
        show_logs(path, grep="(")
    with pytest.raises(ConfigError, match="not a run directory"):
        show_logs(tmp_path / "nowhere")


def test_logs_command(tmp_path):
    path = make_run(tmp_path)
    r = run_cli("logs", str(path), "--grep", "ERROR")
    assert r.returncode == 0, r.stderr
    assert "[site1/worker] ERROR boom" in r.stdout and "[site2/controller.log] ERROR app failed" in r.stdout
    assert "hub ready" not in r.stdout
    r = run_cli("logs", str(tmp_path / "missing"))
    assert r.returncode == 2 and "not a run directory" in r.stderr and "Traceback" not in r.stderr
