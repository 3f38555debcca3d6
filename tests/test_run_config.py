"""What a run makes of the project file and the command line before anything starts: overrides, generated sites and
their credentials, and the one-line refusals (exit 2, nothing started)."""

from __future__ import annotations

import argparse
import os

import pytest
import toml

from fedsim_runner.config import ensure_local_credentials, read_credentials_file
from fedsim_runner.errors import ConfigError
from fedsim_runner.run import resolve_config, resolved_config_text
from tests.test_config import run_cli

PROJECT = """
[project]
name = "fedsim-test-cfg"
workflow = "svd"
credentials = "operator.env"
outdir = "runs"

[data]
source = "sklearn:wine"

[workflow]
k = 3

[[sites]]
name = "alpha"
fc_user = "alpha@fedsim.test"
coordinator = true

[[sites]]
name = "beta"
fc_user = "beta@fedsim.test"

[[sites]]
name = "gamma"
fc_user = "gamma@fedsim.test"
"""


def _args(**kw) -> argparse.Namespace:
    base = dict(config=None, sites=None, split=None, dataset=None, isolation=None, platform=None, timing=None,
                outdir=None, keep=False)
    return argparse.Namespace(**{**base, **kw})


@pytest.fixture
def project(tmp_path):
    path = tmp_path / "project.toml"
    path.write_text(PROJECT)
    return path


def test_overrides_apply_and_relative_paths_stay_relative_to_the_file(project, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path.parent)
    cfg = resolve_config("svd", _args(config=project, split="label-skew", timing="realistic", isolation="process",
                                      outdir=tmp_path / "elsewhere"))
    assert (cfg.data.split, cfg.project.timing, cfg.provider.isolation) == ("label-skew", "realistic", "process")
    assert cfg.outdir == (tmp_path / "elsewhere").resolve()
    assert cfg.resolve(cfg.project.credentials) == tmp_path / "operator.env"  # still next to the project file
    assert [s.name for s in cfg.sites] == ["alpha", "beta", "gamma"]


def test_more_sites_are_generated_and_get_accounts_in_fedsims_own_credentials_file(project, tmp_path):
    cfg = resolve_config("svd", _args(config=project))
    path = ensure_local_credentials(cfg)
    first = read_credentials_file(path)
    assert set(first) == {"alpha@fedsim.test", "beta@fedsim.test", "gamma@fedsim.test"}

    more = resolve_config("svd", _args(config=project, sites=5))
    assert [(s.name, s.fc_user, s.coordinator) for s in more.sites] == [
        ("alpha", "alpha@fedsim.test", True), ("beta", "beta@fedsim.test", False),
        ("gamma", "gamma@fedsim.test", False), ("site1", "site1@fedsim.local", False),
        ("site2", "site2@fedsim.local", False)]
    ensure_local_credentials(more)
    second = read_credentials_file(path)
    assert {k: second[k] for k in first} == first  # existing passwords unchanged
    assert len({second["site1@fedsim.local"], second["site2@fedsim.local"], *first.values()}) == 5
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"


def test_an_operators_own_credentials_file_is_never_extended(project, tmp_path):
    (tmp_path / "operator.env").write_text("alpha@fedsim.test=a\nbeta@fedsim.test=b\ngamma@fedsim.test=c\n")
    more = resolve_config("svd", _args(config=project, sites=4))
    ensure_local_credentials(more)
    assert (tmp_path / "operator.env").read_text() == "alpha@fedsim.test=a\nbeta@fedsim.test=b\ngamma@fedsim.test=c\n"


def test_fewer_sites_keep_a_coordinator(project):
    cfg = resolve_config("svd", _args(config=project, sites=2))
    assert [(s.name, s.coordinator) for s in cfg.sites] == [("alpha", True), ("beta", False)]


@pytest.mark.parametrize(("args", "message"), [
    (dict(sites=0), "--sites 0: a run needs at least one site"),
    (dict(dataset="no-such.csv"), "no-such.csv"),
])
def test_refusals_name_the_option(project, args, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config("svd", _args(config=project, **args))


def test_a_file_for_another_workflow_is_refused(project):
    with pytest.raises(ConfigError, match=r"workflow 'svd'; run `python -m fedsim_runner svd --config"):
        resolve_config("mean", _args(config=project))


def test_resolved_config_is_absolute_and_valid_toml(project, tmp_path):
    cfg = resolve_config("svd", _args(config=project, sites=4))
    doc = toml.loads(resolved_config_text(cfg))
    assert doc["project"]["outdir"] == str(tmp_path / "runs")
    assert doc["project"]["credentials"] == str(tmp_path / "operator.env")  # where they are, never what they are
    assert len(doc["sites"]) == 4


def test_cli_refuses_a_bad_parameter_and_no_sites_before_anything_starts(project, tmp_path):
    r = run_cli("svd", "--config", str(project), "--sites", "0")
    assert r.returncode == 2 and "at least one site" in r.stderr and "Traceback" not in r.stderr
    project.write_text(PROJECT.replace("k = 3", "k = 3\nreference_run = 1"))
    r = run_cli("svd", "--config", str(project))
    assert r.returncode == 2 and "reference_run" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "runs").exists()


def test_a_files_project_takes_any_number_of_sites_once_the_split_is_overridden(tmp_path):
    from fedsim_runner.config import DEFAULT_CONFIGS

    cfg = resolve_config("mean", _args(config=DEFAULT_CONFIGS["mean"], split="iid", dataset="sklearn:iris", sites=2))
    assert [s.name for s in cfg.sites] == ["site1", "site2"] and cfg.data.split == "iid"
    with pytest.raises(ConfigError, match=r'--sites 2: split = "files" takes one site per data file'):
        resolve_config("mean", _args(config=DEFAULT_CONFIGS["mean"], sites=2))
