"""The localfc controller's pieces that need no hub, and its command line errors (real subprocesses)."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import pytest
from fastapi import HTTPException

from fedsim_runner.errors import ConfigError
from fedsim_runner.localfc.controller import hub_origins, project_runs, safe_relative
from fedsim_runner.localfc.project_runner import run_dir, zip_folder
from fedsim_runner.localfc.testbed import image_slug
from fedsim_runner.localfc.timing import Timing
from tests.conftest import REPO, free_port


@pytest.mark.parametrize("image, slug", [
    ("mean-app", "mean-app"),
    ("featurecloud.ai/mean-app", "mean-app"),
    ("featurecloud.ai/mean-app:latest", "mean-app"),
    ("registry:5000/team/federated-svd:1.2", "federated-svd"),
])
def test_image_slug(image, slug):
    assert image_slug(image) == slug


def test_upload_names_stay_inside_the_upload_folder():
    assert str(safe_relative("config.yml")) == "config.yml"
    assert str(safe_relative("split_1/train.csv")) == "split_1/train.csv"
    for bad in ["", "/etc/passwd", "../x", "a/../../x", "..\\x"]:
        with pytest.raises(HTTPException):
            safe_relative(bad)


def test_cors_origins_are_the_hubs_pages():
    assert hub_origins("http://127.0.0.1:8080/") == ["http://127.0.0.1:8080", "http://localhost:8080"]
    assert hub_origins("https://10.213.0.1:9000") == ["https://10.213.0.1:9000"]


def test_project_runs_newest_first_with_steps(tmp_path):
    for nr, steps in [(1, [1]), (3, [1, 2]), (2, [])]:
        folder = run_dir(tmp_path, 7, nr)
        folder.mkdir(parents=True)
        (folder / "run.json").write_text(json.dumps({"startedOn": f"2026-01-0{nr}T00:00:00+00:00"}))
        for k in steps:
            (folder / f"logs_pr7_run{nr}_step{k}.txt").write_text("log")
            (folder / f"results_pr7_run{nr}_step{k}.zip").write_bytes(b"")
    runs = project_runs(tmp_path, 7)
    assert [r["runNr"] for r in runs] == [3, 2, 1]
    assert runs[0] == {"runNr": 3, "startedOn": "2026-01-03T00:00:00+00:00", "logSteps": [1, 2], "resultSteps": [1, 2]}
    assert runs[1]["logSteps"] == [] and project_runs(tmp_path, 8) == []


def test_zip_folder_keeps_subfolders_and_allows_empty_output(tmp_path):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "a.txt").write_text("a")
    (out / "sub" / "b.txt").write_text("b")
    zip_folder(out, tmp_path / "r.zip")
    with zipfile.ZipFile(tmp_path / "r.zip") as z:
        assert sorted(z.namelist()) == ["a.txt", "sub/b.txt"] and z.read("sub/b.txt") == b"b"
    (tmp_path / "empty").mkdir()
    zip_folder(tmp_path / "empty", tmp_path / "e.zip")
    assert zipfile.ZipFile(tmp_path / "e.zip").namelist() == []


def test_timings():
    fast, realistic = Timing.named("fast"), Timing.named("realistic")
    assert fast.query_interval < realistic.query_interval and realistic.engine_waits == {}
    assert set(fast.engine_waits) == {"TRANSITION_WAIT", "TERMINAL_WAIT", "DATA_POLL_INTERVAL"}
    with pytest.raises(ConfigError):
        Timing.named("slow")


def _controller(tmp_path, env):
    argv = [sys.executable, "-m", "fedsim_runner", "controller", "--site", "a", "--hub",
            f"http://127.0.0.1:{free_port()}", "--port", str(free_port()), "--data-dir", str(tmp_path / "d"),
            "--timing", "fast"]
    return subprocess.run(argv, cwd=REPO, env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True,
                          timeout=120)


def test_controller_without_credentials_is_a_config_error(tmp_path):
    done = _controller(tmp_path, {})
    assert done.returncode == 2
    assert "FC_USERNAME and FC_PASSWORD are not set" in done.stderr and "Traceback" not in done.stderr


def test_controller_with_no_hub_fails_in_one_line_without_the_password(tmp_path):
    done = _controller(tmp_path, {"FC_USERNAME": "a@example.org", "FC_PASSWORD": "s3cret-pw"})
    assert done.returncode == 1
    assert "unreachable" in done.stderr and "Traceback" not in done.stderr
    assert "s3cret-pw" not in done.stderr + done.stdout
