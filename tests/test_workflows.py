"""Workflows: app input files parse back, output files parse, and the comparison can pass and can fail.

The "federated" results here are computed the way the federated-SVD app does for few features (each site reads its
own prepared file, sites send sums and covariance contributions, the aggregator takes the eigendecomposition), and
written in the app's output format, so read_result and compare work on independent, real numbers.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from fedsim_runner import compare, data
from fedsim_runner.errors import ConfigError, RunFailed
from fedsim_runner.workflows import mean, svd
from tests.test_data import make_cfg, names


def svd_setup(tmp_path, n_sites=3, source="sklearn:wine", split="iid", workflow_toml="k = 4"):
    cfg = make_cfg(tmp_path, n_sites, data_toml=f'source = "{source}"\nsplit = "{split}"')
    cfg.workflow = dict(line.split(" = ") for line in workflow_toml.splitlines()) if workflow_toml else {}
    cfg.workflow = {k: yaml.safe_load(v) for k, v in cfg.workflow.items()}
    ds = data.load_dataset(cfg)
    sp = data.split(ds, cfg, names(n_sites))
    return cfg, ds, sp


def federated_by_covariance(files: dict[str, dict[str, bytes]], k: int) -> dict[str, pd.DataFrame]:
    """What the app computes, from the prepared files only: federated mean/std, summed covariance, eigh."""
    local = {s: pd.read_csv(io.BytesIO(f["data.tsv"]), sep="\t", index_col=0) for s, f in files.items()}
    n = sum(t.shape[1] for t in local.values())
    means = sum(t.to_numpy().sum(axis=1) for t in local.values()) / n
    sos = sum(((t.to_numpy() - means[:, None]) ** 2).sum(axis=1) for t in local.values())
    std = np.sqrt(sos / (n - 1))
    scaled = {s: (t.to_numpy() - means[:, None]) / std[:, None] for s, t in local.items()}
    cov = sum(x @ x.T for x in scaled.values())
    w, U = np.linalg.eigh(cov)
    order = np.argsort(w)[::-1][:k]
    return {"U": U[:, order], "eig": w[order] / (n - 1), "scaled": scaled, "local": local}


def write_app_output(out: Path, site: str, fed: dict, U: np.ndarray | None = None) -> None:
    """The app's output files (pandas to_csv layout of the upstream app) for one site."""
    U = fed["U"] if U is None else U
    table = fed["local"][site]
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(U, index=table.index).to_csv(out / "left_eigenvectors.tsv", sep="\t")
    proj = fed["scaled"][site].T @ U
    pd.DataFrame(proj, index=table.columns).to_csv(out / "projections.tsv", sep="\t")
    pd.DataFrame(proj / np.linalg.norm(np.vstack([p.T @ U for p in fed["scaled"].values()]), axis=0),
                 index=table.columns).to_csv(out / "right_eigenvectors.tsv", sep="\t")
    pd.DataFrame(fed["eig"]).to_csv(out / "eigenvalues.tsv", sep="\t", header=False, index=False)
    pd.DataFrame(fed["eig"] / fed["eig"].sum()).to_csv(out / "explained_variance.tsv", sep="\t")
    (out / "run_log.txt").write_text("iterations:\t0\nruntime:\t0.25\n")


def test_svd_prepare_files_parse_back_in_the_apps_orientation(tmp_path):
    cfg, ds, sp = svd_setup(tmp_path)
    files = svd.prepare(cfg, ds, sp)
    assert set(files) == set(names(3))
    for site, rows in sp.items():
        table = pd.read_csv(io.BytesIO(files[site]["data.tsv"]), sep="\t", index_col=0)
        assert list(table.index) == ds.feature_names  # rows = features
        assert list(table.columns) == [ds.sample_ids[i] for i in rows]  # columns = this site's samples
        assert np.array_equal(table.to_numpy(), ds.X[rows].T)  # exact round trip (repr of floats)
        conf = yaml.safe_load(files[site]["config.yml"])["fc_pca"]
        assert conf["input"] == {"data": "data.tsv", "dir": "", "delimiter": "\t"}
        assert conf["algorithm"]["pcs"] == 4
        assert conf["scaling"]["center"] is True and conf["scaling"]["variance"] is True
        assert set(conf["output"]) >= {"left_eigenvectors", "right_eigenvectors", "eigenvalues", "projections",
                                       "explained_variance", "delimiter"}


def test_svd_single_site_reference_input_holds_all_data(tmp_path):
    cfg, ds, _ = svd_setup(tmp_path)
    files = svd.prepare(cfg, ds, svd.single_site_split(ds, "site0"))
    table = pd.read_csv(io.BytesIO(files["site0"]["data.tsv"]), sep="\t", index_col=0)
    assert table.shape == (ds.n_features, ds.n_samples)


def test_svd_k_too_large_and_unknown_parameter_are_config_errors(tmp_path):
    cfg, ds, sp = svd_setup(tmp_path, workflow_toml="k = 50")
    with pytest.raises(ConfigError, match=r"workflow.k = 50 exceeds min\(features, samples\) = 13"):
        svd.prepare(cfg, ds, sp)
    cfg.workflow = {"pcs": 3}
    with pytest.raises(ConfigError, match=r"workflow.pcs: unknown parameter for the svd workflow"):
        svd.params(cfg)
    cfg.workflow = {"center": "yes"}
    with pytest.raises(ConfigError, match=r"workflow.center: expected bool"):
        svd.params(cfg)


@pytest.mark.parametrize("split", ["iid", "label-skew", "size-skew"])
def test_svd_exact_federated_result_compares_to_near_zero_angles(tmp_path, split):
    cfg, ds, sp = svd_setup(tmp_path, split=split)
    files = svd.prepare(cfg, ds, sp)
    fed = federated_by_covariance(files, 4)
    results = {}
    for site in sp:
        write_app_output(tmp_path / "out" / site, site, fed)
        results[site] = svd.read_result(tmp_path / "out" / site)
    assert results["site0"]["iterations"] == 0 and results["site0"]["runtime"] == 0.25
    p = svd.params(cfg)
    result = svd.compare(results, svd.centralized(ds, p), sp, params=p)
    assert result["passed"] is True
    assert result["max_angle"] < 1e-9 and result["subspace_angle"] < 1e-9
    assert result["eigenvalues"]["max_relative_error"] < 1e-9
    for site in sp:
        assert result["sites"][site]["projections"]["max_abs_diff"] < 1e-9
        assert result["sites"][site]["right"]["max_abs_diff"] < 1e-9
        assert min(result["sites"][site]["projections"]["correlation_per_component"]) > 1 - 1e-12
    json.dumps(compare.jsonable(result))  # the comparison is JSON-able as the run directory needs


def test_svd_perturbed_result_fails_with_large_angles(tmp_path):
    cfg, ds, sp = svd_setup(tmp_path)
    fed = federated_by_covariance(svd.prepare(cfg, ds, sp), 4)
    theta = 1e-3  # rotate components 1 and 2 towards each other: the subspace stays, the vectors move
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]
    bent = fed["U"] @ rot
    results = {}
    for site in sp:
        write_app_output(tmp_path / site, site, fed, U=bent)
        results[site] = svd.read_result(tmp_path / site)
    p = svd.params(cfg)
    result = svd.compare(results, svd.centralized(ds, p), sp, params=p)
    assert result["passed"] is False
    assert result["max_angle"] == pytest.approx(theta, rel=1e-6)
    assert result["subspace_angle"] < 1e-9  # same span
    assert result["angles"][2] < 1e-9 and result["angles"][3] < 1e-9
    # a wrong subspace: replace the 4th vector by the 6th centralized direction
    central = svd.centralized(ds, {**p, "k": 6})
    wrong = fed["U"].copy()
    wrong[:, 3] = central["left"][:, 5]
    for site in sp:
        write_app_output(tmp_path / site, site, fed, U=wrong)
        results[site] = svd.read_result(tmp_path / site)
    result = svd.compare(results, svd.centralized(ds, p), sp, params=p)
    assert result["subspace_angle"] == pytest.approx(np.pi / 2, rel=1e-6)
    assert result["passed"] is False


def test_svd_reference_run_is_compared_too(tmp_path):
    cfg, ds, sp = svd_setup(tmp_path)
    fed = federated_by_covariance(svd.prepare(cfg, ds, sp), 4)
    ref_split = svd.single_site_split(ds, "site0")
    ref = federated_by_covariance(svd.prepare(cfg, ds, ref_split), 4)
    write_app_output(tmp_path / "ref", "site0", ref)
    results = {}
    for site in sp:
        write_app_output(tmp_path / site, site, fed)
        results[site] = svd.read_result(tmp_path / site)
    p = svd.params(cfg)
    result = svd.compare(results, svd.centralized(ds, p), sp, params=p, reference=svd.read_result(tmp_path / "ref"))
    assert max(result["reference"]["angles_federated_vs_reference"]) < 1e-9
    assert max(result["reference"]["angles_reference_vs_centralized"]) < 1e-9


def test_svd_missing_output_is_a_run_failure_naming_the_folder(tmp_path):
    (tmp_path / "siteX").mkdir()
    with pytest.raises(RunFailed, match=r"siteX: the app wrote no left_eigenvectors.tsv"):
        svd.read_result(tmp_path / "siteX")


def test_svd_nested_output_and_renamed_files_are_found(tmp_path):
    cfg, ds, sp = svd_setup(tmp_path, n_sites=1)
    files = svd.prepare(cfg, ds, sp)
    fed = federated_by_covariance(files, 4)
    nested = tmp_path / "zip" / "output"
    write_app_output(nested, "site0", fed)
    (nested / "left_eigenvectors.tsv").rename(nested / "U.tsv")
    conf = yaml.safe_load(files["site0"]["config.yml"])
    conf["fc_pca"]["output"]["left_eigenvectors"] = "U.tsv"
    (nested / "config.yml").write_text(yaml.safe_dump(conf))
    result = svd.read_result(tmp_path / "zip")
    assert result["left"].shape == (ds.n_features, 4)


def test_evaluate_writes_comparison_and_centralized(tmp_path):
    cfg, ds, sp = svd_setup(tmp_path)
    fed = federated_by_covariance(svd.prepare(cfg, ds, sp), 4)
    results = {}
    for site in sp:
        write_app_output(tmp_path / site, site, fed)
        results[site] = svd.read_result(tmp_path / site)
    run = tmp_path / "run"
    out = compare.evaluate("svd", cfg, ds, sp, results, run)
    assert out["passed"] is True and out["dataset"]["samples"] == ds.n_samples
    assert json.loads((run / "comparison.json").read_text())["max_angle"] == out["max_angle"]
    central = json.loads((run / "centralized" / "result.json").read_text())
    assert np.asarray(central["left"]).shape == (ds.n_features, 4)


def test_component_angles_are_accurate_for_tiny_angles():
    rng = np.random.default_rng(0)
    a = np.linalg.qr(rng.standard_normal((50, 3)))[0]
    b = a.copy()
    for eps in (1e-5, 1e-7, 1e-9, 1e-11):
        b[:, 0] = np.cos(eps) * a[:, 0] + np.sin(eps) * a[:, 1]
        assert compare.component_angles(-b, a)[0] == pytest.approx(eps, rel=1e-4)


# ------------------------------------------------------------------------------------------------------------ mean


def mean_setup(tmp_path):
    for i, line in enumerate(["1,2,3,4,5", "7,9,11", "2,2,2,4,6,6,6"]):
        (tmp_path / f"c{i}.csv").write_text(line + "\n")
    cfg = make_cfg(tmp_path, 3, workflow="mean", data_toml='split = "files"',
                   sites_extra={i: f'data = ["c{i}.csv"]\n' for i in range(3)})
    ds = data.load_dataset(cfg)
    return cfg, ds, data.split(ds, cfg, names(3))


def test_mean_prepare_and_the_documented_example(tmp_path):
    cfg, ds, sp = mean_setup(tmp_path)
    files = mean.prepare(cfg, ds, sp)
    assert files["site1"]["data.csv"] == b"7.0,9.0,11.0\n"
    assert yaml.safe_load(files["site0"]["config.yml"]) == {"fc_mean": {"input_name": "data.csv",
                                                                         "output_name": "output.csv"}}
    # the app's result at every site: the mean of the local means, computed from the files as the app would
    local = [np.mean([float(v) for v in f["data.csv"].decode().split(",")]) for f in files.values()]
    results = {}
    for site in sp:
        (tmp_path / site).mkdir()
        (tmp_path / site / "output.csv").write_text(f"{float(np.mean(local))!r}\n")
        results[site] = mean.read_result(tmp_path / site)
    p = mean.params(cfg)
    result = mean.compare(results, mean.centralized(ds, p), sp, params=p)
    assert result["passed"] is True
    assert result["federated"] == pytest.approx(16 / 3) and round(result["federated"], 4) == 5.3333
    assert result["pooled_mean"] == pytest.approx(70 / 15)
    assert result["mean_of_local_means"] == pytest.approx(16 / 3)


def test_mean_wrong_value_fails(tmp_path):
    cfg, ds, sp = mean_setup(tmp_path)
    results = {s: {"mean": 70 / 15} for s in sp}  # the pooled mean is not what the app should compute
    result = mean.compare(results, mean.centralized(ds, mean.params(cfg)), sp)
    assert result["passed"] is False and result["abs_error"] == pytest.approx(16 / 3 - 70 / 15)


def test_mean_on_a_sklearn_column(tmp_path):
    cfg = make_cfg(tmp_path, 2, workflow="mean", data_toml='source = "sklearn:iris"')
    cfg.workflow = {"column": "petal_length_(cm)"}
    ds = data.load_dataset(cfg)
    sp = data.split(ds, cfg, names(2))
    files = mean.prepare(cfg, ds, sp)
    values = [float(v) for v in files["site0"]["data.csv"].decode().split(",")]
    assert values == ds.X[sp["site0"], 2].tolist()
    cfg.workflow = {"column": "nope"}
    with pytest.raises(ConfigError, match="workflow.column = 'nope': no such feature"):
        mean.prepare(cfg, ds, sp)


# ----------------------------------------------------------------------------------------------- Snakemake grid

SNAKEMAKE = Path(sys.executable).parent / "snakemake"
needs_snakemake = pytest.mark.skipif(not SNAKEMAKE.exists(), reason="snakemake is in the dev extras: pip install -e .[dev]")
REPO = Path(__file__).resolve().parent.parent


def snakemake(configfile: Path, *args):
    return subprocess.run(
        [str(SNAKEMAKE), "-s", str(REPO / "workflow" / "Snakefile"), "--configfile", str(configfile),
         "-d", str(REPO), "-j", "1", "--rerun-triggers", "mtime", *args],
        capture_output=True, text=True, timeout=300,
    )


@needs_snakemake
def test_snakemake_dry_run_lists_the_whole_grid(tmp_path):
    project = tmp_path / "project.toml"
    project.write_text("")
    proc = snakemake(REPO / "workflow" / "config.yaml", "-n", "--config", f"configs={{svd: {project}, mean: {project}}}", f"outdir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    counts = dict(re.findall(r"^(run|summary|all)\s+(\d+)$", proc.stdout, re.M))
    assert counts == {"run": "40", "summary": "1", "all": "1"}  # svd 3×3×4 + mean 1×2×2


@needs_snakemake
def test_snakemake_summarises_finished_runs(tmp_path):
    """Grid points whose comparison.json exists are not rerun; the summary rule tabulates them."""
    cfg, ds, sp = svd_setup(tmp_path)
    fed = federated_by_covariance(svd.prepare(cfg, ds, sp), 4)
    results = {}
    for site in sp:
        write_app_output(tmp_path / "out" / site, site, fed)
        results[site] = svd.read_result(tmp_path / "out" / site)
    out = tmp_path / "grid"
    point = out / "svd" / "wine" / "iid" / "sites3"
    compare.evaluate("svd", cfg, ds, sp, results, point)
    hour_ago = time.time() - 3600
    os.utime(tmp_path / "project.toml", (hour_ago, hour_ago))  # the runs are newer than their project file
    grid_config = tmp_path / "grid.yaml"
    grid_config.write_text(yaml.safe_dump({
        "configs": {"svd": str(tmp_path / "project.toml")},
        "datasets": {"wine": "sklearn:wine"},
        "grid": {"svd": {"datasets": ["wine"], "splits": ["iid"], "sites": [3]}},
        "outdir": str(out),
    }))
    proc = snakemake(grid_config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (out / "summary.tsv").read_text().splitlines()
    assert len(lines) == 2 and "\tsklearn:wine\tiid\t3\t178\tyes\t" in lines[1]
    assert (out / "summary.png").read_bytes().startswith(b"\x89PNG")


# ------------------------------------------------------------------------ the real apps, on localfc's testbed

APPS_PYTHON = REPO / ".venv-apps" / "bin" / "python"


def run_on_testbed(tmp_path: Path, slug: str, files: dict[str, dict[str, bytes]]) -> dict[str, Path]:
    """Every site's files as one client of the real app (engine in .venv-apps); {site: its output folder}."""
    from fedsim_runner.backoff import wait_until
    from fedsim_runner.localfc.testbed import Testbed
    from fedsim_runner.localfc.timing import Timing

    data_dir = (tmp_path / "controller").resolve()
    for site, site_files in files.items():
        (data_dir / site).mkdir(parents=True)
        for name, content in site_files.items():
            (data_dir / site / name).write_bytes(content)
    testbed = Testbed(data_dir, Timing.named("fast"), log=lambda *args: None)
    test_id = testbed.start({"dockerImage": slug, "directories": list(files)})
    try:
        status = wait_until(lambda: testbed.info(test_id)["status"] not in ("running", "writing"), timeout=180)
        assert status, "the testbed run did not finish within 180 s"
        assert testbed.info(test_id)["status"] == "finished", testbed.logs(test_id, 0, 0)[-20:]
    finally:
        testbed.stop_all()
    return {site: data_dir / "tests" / f"test_{test_id}" / f"client_{i}" / "output" for i, site in enumerate(files)}


needs_apps = pytest.mark.skipif(not APPS_PYTHON.exists(), reason="needs the apps environment .venv-apps (`make venv`)")


@needs_apps
@pytest.mark.e2e
@pytest.mark.parametrize("source,workflow_toml", [
    ("sklearn:wine", "k = 4"),  # 13 features ≤ 20·k: the app's covariance path
    ("sklearn:breast_cancer", "k = 1\nvariance = false"),  # 30 features > 20·k: subspace iteration, centring only
])
def test_svd_real_app_reproduces_the_centralized_svd(tmp_path, source, workflow_toml):
    cfg, ds, sp = svd_setup(tmp_path, source=source, split="size-skew", workflow_toml=workflow_toml)
    outputs = run_on_testbed(tmp_path, svd.APP_SLUG, svd.prepare(cfg, ds, sp))
    federated = {site: svd.read_result(folder) for site, folder in outputs.items()}
    result = compare.evaluate("svd", cfg, ds, sp, federated, tmp_path / "run")
    assert result["passed"] is True, result["angles"]
    assert result["eigenvalues"]["max_relative_error"] < 1e-8
    for site in sp:
        assert result["sites"][site]["projections"]["max_rel_diff"] < 1e-6
        assert result["sites"][site]["right"]["max_rel_diff"] < 1e-6


@needs_apps
@pytest.mark.e2e
def test_mean_real_app_gives_the_documented_example(tmp_path):
    cfg, ds, sp = mean_setup(tmp_path)
    outputs = run_on_testbed(tmp_path, mean.APP_SLUG, mean.prepare(cfg, ds, sp))
    federated = {site: mean.read_result(folder) for site, folder in outputs.items()}
    result = compare.evaluate("mean", cfg, ds, sp, federated, tmp_path / "run")
    assert result["passed"] is True and round(result["federated"], 4) == 5.3333
