"""One run, one directory: `runs/<UTC timestamp>-<workflow>/` with `fedsim.log` and `metrics.json`.

`fedsim.log` gets everything: FedSim's own loggers (`fedsim.*`, `fedsim_runner.*`) at every level, other libraries'
warnings, Ansible events and the site logs collected after the run (`append_site_log`). `metrics.json` holds the
orchestrator's phases (wall time, CPU of FedSim and its children, memory) and every site's step times; it is written
even when the run fails. A `Redactor` replaces every known secret by `***` in log records and in the files FedSim
writes here, so the run directory can be shared.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import resource
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from fedsim_runner.errors import ConfigError

LOG_FILE = "fedsim.log"
METRICS_FILE = "metrics.json"
MASK = "***"
# FedSim's loggers: everything they log reaches fedsim.log; other libraries' records only from WARNING up (root level)
OWN_LOGGERS = ("fedsim", "fedsim_runner")


class Redactor(logging.Filter):
    """Replaces every known secret by `***`: as a logging.Filter on handlers, and in text with `redact`.

    Secrets are also caught in the forms they take in URLs and JSON (percent-encoded, escaped).
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._forms: set[str] = set()
        self._pattern: re.Pattern[str] | None = None
        for secret in secrets:
            self.add_secret(secret)

    def add_secret(self, secret: str | None) -> None:
        if not secret:
            return
        secret = str(secret)
        forms = {
            secret,
            json.dumps(secret)[1:-1],
            urllib.parse.quote(secret, safe=""),
            urllib.parse.quote_plus(secret),
        }
        with self._lock:
            self._forms |= {f for f in forms if f}
            # longest first, so that a secret containing another is masked whole
            alternatives = sorted(self._forms, key=len, reverse=True)
            self._pattern = re.compile("|".join(re.escape(f) for f in alternatives))

    def redact(self, text: str) -> str:
        pattern = self._pattern
        return pattern.sub(MASK, text) if pattern and text else text

    def filter(self, record: logging.LogRecord) -> bool:
        # the formatted message, the exception text and the stack are all the text a handler will print
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: still log, and still redact what is there
            message = f"{record.msg} {record.args}"
        record.msg, record.args = self.redact(message), None
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None  # handlers would otherwise render the exception again, unredacted
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True


def _rusage() -> tuple[float, int, int]:
    """(CPU seconds of this process and its waited-for children, peak RSS of this process, of the largest child)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    return cpu, own.ru_maxrss * 1024, children.ru_maxrss * 1024  # Linux reports KiB


def _live_children_rss() -> int:
    """Resident memory of FedSim's running child processes (hub, scheduler, sites…), summed."""
    total = 0
    for child in psutil.Process().children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:  # exited meanwhile
            continue
    return total


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class RunDir:
    """The run directory of one run. Use `with RunDir.create(outdir, workflow) as run:` so that metrics.json is
    written and the log closed whatever happens."""

    def __init__(self, path: Path, workflow: str, redactor: Redactor | None = None) -> None:
        self.path = Path(path)
        self.workflow = workflow
        self.redactor = redactor or Redactor()
        self.started = time.time()
        self.metrics: dict[str, Any] = {"phases": [], "sites": {}}
        self._status: dict[str, Any] = {"status": "running"}
        self._lock = threading.Lock()
        self._closed = False

        self.log = logging.getLogger("fedsim.run")
        self._handler = logging.FileHandler(self.path / LOG_FILE, encoding="utf-8")
        self._handler.setLevel(logging.DEBUG)
        formatter = logging.Formatter("%(asctime)s.%(msecs)03dZ %(levelname)-7s %(name)s: %(message)s",
                                      "%Y-%m-%dT%H:%M:%S")
        formatter.converter = time.gmtime
        self._handler.setFormatter(formatter)
        self._handler.addFilter(self.redactor)
        # every handler that may print a record of this run gets the redactor (console handlers included)
        self._filtered: list[logging.Handler] = []
        root = logging.getLogger()
        self._levels = {name: logging.getLogger(name).level for name in OWN_LOGGERS}  # restored on close
        for name in OWN_LOGGERS:
            logger = logging.getLogger(name)
            logger.setLevel(logging.DEBUG)
            self._install(logger.handlers)
        self._install(root.handlers)
        root.addHandler(self._handler)
        self.log.info("run directory %s (workflow %s)", self.path, workflow)

    def _install(self, handlers: list[logging.Handler]) -> None:
        for h in handlers:
            if self.redactor not in h.filters:
                h.addFilter(self.redactor)
                self._filtered.append(h)

    @classmethod
    def create(cls, outdir: Path | str, workflow: str, redactor: Redactor | None = None) -> RunDir:
        """A new `<outdir>/<UTC timestamp>-<workflow>/`; `-2`, `-3`… when another run started in the same second."""
        if not re.match(r"^[A-Za-z0-9_-]+$", workflow):
            raise ConfigError(f"workflow {workflow!r}: not usable in a folder name; use letters, digits, '-' and '_'")
        outdir = Path(outdir)
        try:
            outdir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"{outdir}: cannot create the runs folder ({e.strerror}); set project.outdir") from None
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        for n in itertools.count(1):
            path = outdir / (f"{stamp}-{workflow}" if n == 1 else f"{stamp}-{workflow}-{n}")
            try:
                path.mkdir()  # atomic: two runs never share a directory
                break
            except FileExistsError:
                continue
        return cls(path, workflow, redactor)

    # --- secrets ----------------------------------------------------------------------------------------------------

    def add_secrets(self, secrets: Iterable[str]) -> None:
        for s in secrets:
            self.redactor.add_secret(s)

    # --- metrics ----------------------------------------------------------------------------------------------------

    @contextmanager
    def phase(self, name: str, site: str | None = None) -> Iterator[None]:
        """Time a phase of the run (or of one site's work); recorded also when the body raises."""
        start, t0 = time.time(), time.perf_counter()
        cpu0, _, _ = _rusage()
        where = f" [{site}]" if site else ""
        self.log.info("phase %s%s started", name, where)
        entry: dict[str, Any] = {"name": name, "start": start}
        try:
            yield
            entry["status"] = "ok"
        except BaseException as e:
            entry["status"] = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            entry["error"] = self.redactor.redact(_one_line(f"{type(e).__name__}: {e}"))
            raise
        finally:
            cpu1, peak, children_peak = _rusage()
            wall = time.perf_counter() - t0
            entry.update(end=start + wall, wall=wall, cpu=cpu1 - cpu0, peak_rss=peak,
                         children_peak_rss=children_peak, children_rss=_live_children_rss())
            with self._lock:
                if site is None:
                    self.metrics["phases"].append(entry)
                else:
                    self._site(site)["steps"].append(entry)
            self.log.info("phase %s%s %s in %.3f s (cpu %.3f s, peak rss %.0f MB)", name, where, entry["status"],
                          wall, entry["cpu"], peak / 2**20)

    def _site(self, site: str) -> dict[str, Any]:
        return self.metrics["sites"].setdefault(site, {"steps": []})

    def record_site_step(self, site: str, step: str, seconds: float) -> None:
        """A step a site finished just now that took `seconds` (the Dask cluster reports every task this way)."""
        end = time.time()
        with self._lock:
            self._site(site)["steps"].append({"name": step, "start": end - seconds, "end": end, "wall": seconds})
        self.log.debug("site %s: %s took %.3f s", site, step, seconds)

    def add_metric(self, key: str, value: Any) -> None:
        """A run-level number (rounds, bytes relayed, …) in metrics.json."""
        if key in ("phases", "sites", "status", "error"):
            raise ValueError(f"metrics key {key!r} is reserved")
        with self._lock:
            self.metrics[key] = value

    def write_metrics(self) -> Path:
        now = time.time()
        with self._lock:
            document = {
                "workflow": self.workflow,
                "run": self.path.name,
                "started": self.started,
                "updated": now,
                "wall": now - self.started,
                **self._status,
                **self.metrics,
            }
            text = json.dumps(document, indent=2, default=str)
        return self.write_text(METRICS_FILE, text + "\n")

    # --- files and logs -----------------------------------------------------------------------------------------------

    def write_text(self, path: Path | str, text: str) -> Path:
        """Write a file of the run directory (relative paths are inside it) with every known secret redacted."""
        target = Path(path) if Path(path).is_absolute() else self.path / path
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(self.redactor.redact(text), encoding="utf-8")
        tmp.replace(target)
        return target

    def write_json(self, path: Path | str, document: Any) -> Path:
        return self.write_text(path, json.dumps(document, indent=2, default=str) + "\n")

    def append_site_log(self, site: str, source: str, text: str) -> None:
        """Add a log collected from a site (controller, app, worker…) to fedsim.log, each line prefixed."""
        logger = logging.getLogger("fedsim.site")
        for line in text.splitlines():
            if line.strip():
                logger.info("[%s/%s] %s", site, source, line)

    # --- lifetime ---------------------------------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        logging.getLogger().removeHandler(self._handler)
        self._handler.close()
        for h in self._filtered:
            h.removeFilter(self.redactor)
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self._status = {"status": "ok"}
        else:
            status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            self._status = {"status": status, "error": self.redactor.redact(_one_line(f"{exc_type.__name__}: {exc}"))}
            self.log.error("run %s: %s", status, exc)
        try:
            self.write_metrics()
            self.log.info("metrics written to %s", self.path / METRICS_FILE)
        finally:
            self.close()


def _run_dir(run: Path) -> Path:
    """The run directory for `logs RUN`: a path, or the name of a folder under runs/."""
    for candidate in (run, Path("runs") / run):
        if (candidate / LOG_FILE).is_file():
            return candidate
    raise ConfigError(f"{run}: not a run directory (no {LOG_FILE}); pass one of the folders under runs/")


def show_logs(run: Path | str, site: str | None = None, grep: str | None = None, out=None) -> int:
    """`python -m fedsim_runner logs RUN [--site S] [--grep RE]`: fedsim.log, then each site's collected logs."""
    out = out or sys.stdout
    path = _run_dir(Path(run))
    try:
        pattern = re.compile(grep, re.IGNORECASE) if grep else None
    except re.error as e:
        raise ConfigError(f"--grep {grep!r}: not a regular expression ({e}); escape special characters") from None
    sites_dir = path / "sites"
    known = sorted(p.name for p in sites_dir.iterdir() if p.is_dir()) if sites_dir.is_dir() else []
    if site is not None and site not in known:
        text = (path / LOG_FILE).read_text(encoding="utf-8", errors="replace")
        if not re.search(rf"\b{re.escape(site)}\b", text):
            listed = ", ".join(known) if known else "none collected"
            raise ConfigError(f"--site {site}: no such site in {path} (sites: {listed}); use one of them")
    site_re = re.compile(rf"\b{re.escape(site)}\b") if site else None

    def emit(lines: Iterable[str], prefix: str) -> None:
        for line in lines:
            if (site_re is None or prefix or site_re.search(line)) and (pattern is None or pattern.search(line)):
                out.write(f"{prefix}{line}\n")

    emit((path / LOG_FILE).read_text(encoding="utf-8", errors="replace").splitlines(), "")
    for name in [site] if site else known:
        logs = sites_dir / name / "logs"
        if not logs.is_dir():
            continue
        for f in sorted(p for p in logs.rglob("*") if p.is_file()):
            rel = f.relative_to(logs)
            emit(f.read_text(encoding="utf-8", errors="replace").splitlines(), f"[{name}/{rel}] ")
    return 0

