"""The report: renders from a real comparison, embeds its plots, leaks no account names; a browser can show it."""

from __future__ import annotations

import base64
import io
import re
import subprocess

import numpy as np
import pytest
from rich.console import Console

from fedsim_runner import compare, report
from fedsim_runner.workflows import svd
from tests.conftest import CHROMIUM, needs_chromium
from tests.test_workflows import federated_by_covariance, mean_setup, svd_setup, write_app_output

METRICS = {  # what runlog.py records: orchestrator phases (epoch seconds) and per-site steps
    "phases": [
        {"name": "sites", "start": 1000.0, "wall": 0.4, "cpu": 0.1, "peak_rss": 80 * 2**20},
        {"name": "distribute", "start": 1000.4, "wall": 1.1, "cpu": 0.5, "peak_rss": 90 * 2**20},
        {"name": "services", "start": 1001.5, "wall": 1.6, "cpu": 0.3, "peak_rss": 95 * 2**20},
        {"name": "run", "start": 1003.1, "wall": 4.2, "cpu": 0.2, "peak_rss": 96 * 2**20},
        {"name": "compare", "start": 1007.3, "wall": 0.3, "cpu": 0.3, "peak_rss": 120 * 2**20, "status": "failed",
         "error": "RunFailed: site site1: no result"},
    ],
    "sites": {
        "site0": {"steps": [{"name": "join", "start": 1003.2, "end": 1003.5},
                            {"name": "upload", "start": 1003.5, "end": 1004.0},
                            {"name": "wait", "start": 1004.0, "end": 1007.0},
                            {"name": "download", "start": 1007.0, "end": 1007.2}]},
        "site1": {"join": 0.2, "upload": 0.6, "wait": 2.9, "download": 0.2},
    },
}


@pytest.fixture
def svd_comparison(tmp_path):
    cfg, ds, sp = svd_setup(tmp_path)
    fed = federated_by_covariance(svd.prepare(cfg, ds, sp), 4)
    results = {}
    for site in sp:
        write_app_output(tmp_path / "out" / site, site, fed)
        results[site] = svd.read_result(tmp_path / "out" / site)
    run = tmp_path / "run"
    return cfg, compare.evaluate("svd", cfg, ds, sp, results, run), run


def embedded_pngs(html: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def test_svd_report_renders_with_three_plots(svd_comparison):
    cfg, comparison, run = svd_comparison
    md, html_path = report.write_report(run, comparison, METRICS, cfg)
    html = html_path.read_text()
    pngs = embedded_pngs(html)
    assert len(pngs) == 3 and all(p.startswith(b"\x89PNG") and len(p) > 5000 for p in pngs)
    for alt in ("per-component angle bar chart", "projections per site", "timeline"):
        assert alt in html
    assert "PASSED" in html and "sklearn:wine" in html
    assert "http://" not in html.replace("http://www.w3.org", "")  # self-contained: nothing to fetch
    text = md.read_text()
    assert "largest component angle" in text and "| site0 |" in text and "| distribute | 1.1 |" in text
    assert "| compare | 0.3 | 0.3 | 120 | failed |" in text
    for site in cfg.sites:  # FeatureCloud accounts are not part of the report
        assert site.fc_user not in html and site.fc_user not in text


def test_failed_comparison_says_failed(svd_comparison):
    cfg, comparison, run = svd_comparison
    comparison = {**comparison, "passed": False, "angles": [0.1, 1e-3, 0.0, 2e-9], "max_angle": 0.1}
    _, html_path = report.write_report(run, comparison, {}, cfg)
    html = html_path.read_text()
    assert "FAILED" in html and len(embedded_pngs(html)) == 2  # no metrics: no timeline


def test_timeline_lays_out_sites_and_phases():
    lanes = report.timeline(METRICS)
    assert list(lanes) == ["orchestrator", "site0", "site1"]
    assert lanes["orchestrator"][0] == ("sites", 0.0, 0.4)
    assert lanes["site0"][2][0] == "wait" and lanes["site0"][2][1] == pytest.approx(4.0)
    # steps without start times follow one another
    assert [round(b, 3) for _, b, _ in lanes["site1"]] == [0.0, 0.2, 0.8, 3.7]


def test_summary_table_prints_the_verdict_and_numbers(svd_comparison):
    _, comparison, _ = svd_comparison
    console = Console(file=io.StringIO(), width=120, color_system=None)
    console.print(report.summary_table(comparison))
    out = console.file.getvalue()
    assert "PASSED" in out and "largest component angle" in out and "wine" in out


def test_mean_report_and_table(tmp_path):
    cfg, ds, sp = mean_setup(tmp_path)
    results = {s: {"mean": 16 / 3} for s in sp}
    comparison = compare.evaluate("mean", cfg, ds, sp, results, tmp_path / "run")
    md, html_path = report.write_report(tmp_path / "run", comparison, METRICS, cfg)
    assert "| 5.333333 |" in md.read_text() and "| 4.666667 |" in md.read_text()
    assert len(embedded_pngs(html_path.read_text())) == 1  # only the timeline
    console = Console(file=io.StringIO(), width=120, color_system=None)
    console.print(report.summary_table(comparison))
    assert "mean of local means" in console.file.getvalue()


def test_grid_summary(tmp_path, svd_comparison):
    _, _, run = svd_comparison
    (tmp_path / "m").mkdir()
    cfg, ds, sp = mean_setup(tmp_path / "m")
    mean_run = tmp_path / "mrun"
    compare.evaluate("mean", cfg, ds, sp, {s: {"mean": 16 / 3} for s in sp}, mean_run)
    rows = report.write_grid_summary([run / "comparison.json", mean_run / "comparison.json"],
                                     tmp_path / "summary.tsv", tmp_path / "summary.png")
    assert [r["workflow"] for r in rows] == ["mean", "svd"] and all(r["passed"] for r in rows)
    lines = (tmp_path / "summary.tsv").read_text().splitlines()
    assert lines[0].startswith("workflow\tdataset\tsplit\tsites") and len(lines) == 3
    assert (tmp_path / "summary.png").read_bytes().startswith(b"\x89PNG")


@needs_chromium
@pytest.mark.browser
def test_report_shows_in_chromium(svd_comparison, tmp_path):
    cfg, comparison, run = svd_comparison
    _, html_path = report.write_report(run, comparison, METRICS, cfg)
    shot = tmp_path / "report.png"
    subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         "--window-size=1200,2400", f"--screenshot={shot}", html_path.as_uri()],
        check=True, capture_output=True, timeout=120,
    )
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[0] == 2400 and pixels.shape[1] == 1200
    # the page is not blank: the plots put many distinct colours on it
    colours = np.unique((pixels[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 200
