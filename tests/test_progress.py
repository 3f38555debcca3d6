"""The progress display: phases advance, each site shows its step, failures are shown, nothing drawn off a terminal."""

from __future__ import annotations

import io

from rich.console import Console

from fedsim_runner.progress import RunProgress


def test_progress_rows_follow_phases_and_sites():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    with RunProgress(["sites", "distribute", "run"], ["site1", "site2"], console=console) as p:
        p.phase("distribute")
        p.site_step("site1", "upload")
        p.on_step("site2", "join", 1.5)
        assert p.state() == {"run": "distribute", "site1": "upload", "site2": "join done (1.5 s)"}
        p.site_done("site1")
        p.site_failed("site2", "app error [exit 1]")
        p.finish()
    text = out.getvalue()
    assert "site1" in text and "done" in text and "app error [exit 1]" in text


def test_nothing_is_drawn_off_a_terminal():
    out = io.StringIO()
    with RunProgress(["run"], ["site1"], console=Console(file=out, force_terminal=False)) as p:
        p.phase("run")
        p.site_done("site1")
    assert out.getvalue() == ""
