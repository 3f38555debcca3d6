"""Progress display for long runs (rich): one bar for the run's phases and one line per site with its current step.

`with RunProgress(["sites", "distribute", "run"], ["site1", "site2"]) as progress:` then `progress.phase("run")`,
`progress.site_step("site1", "upload")`, `progress.site_done("site1")`. `progress.on_step` has the signature of the
Dask cluster's `on_step(site, step, seconds)` callback. On a console that is not a terminal (CI, pipes) nothing is
drawn: fedsim.log has the same information.
"""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn


class RunProgress:
    def __init__(self, phases: list[str], sites: list[str], console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.phases = list(phases)
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.fields[label]:<12}"),
            BarColumn(bar_width=24),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=self.console,
            disable=not self.console.is_terminal,
            transient=False,
        )
        self._run = self._progress.add_task("starting", total=len(self.phases), label="run")
        self._sites: dict[str, TaskID] = {
            s: self._progress.add_task("waiting", total=1, label=s, start=False) for s in sites
        }
        self._current: str | None = None

    def __enter__(self) -> RunProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()

    def phase(self, name: str) -> None:
        """The run entered phase `name`: the phases before it count as done."""
        done = self.phases.index(name) if name in self.phases else self._progress.tasks[self._run].completed
        self._current = name
        self._progress.update(self._run, completed=done, description=name)

    def finish(self, status: str = "done") -> None:
        self._progress.update(self._run, completed=len(self.phases), description=status)

    def site_step(self, site: str, step: str) -> None:
        task = self._sites[site]
        self._progress.start_task(task)
        self._progress.update(task, description=step)

    def on_step(self, site: str, step: str, seconds: float) -> None:
        """A site finished `step` (the Dask cluster's callback)."""
        self.site_step(site, f"{step} done ({seconds:.1f} s)")

    def site_done(self, site: str, status: str = "done") -> None:
        task = self._sites[site]
        self._progress.start_task(task)
        self._progress.update(task, completed=1, description=status)

    def site_failed(self, site: str, reason: str) -> None:
        self.site_done(site, f"[red]failed[/red]: {escape(reason)}")

    def state(self) -> dict[str, str]:
        """What each row shows now ({"run": phase, site: step}), for tests and the final summary."""
        tasks = {t.id: t for t in self._progress.tasks}
        rows = {"run": tasks[self._run].description}
        rows.update({site: tasks[task].description for site, task in self._sites.items()})
        return rows
