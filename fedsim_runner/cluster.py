"""Dask for FedSim: a scheduler on the orchestrator, one worker per site named after it, and pinned submission.

DESIGN §7: every task runs on exactly the site it names (`workers=[site]`, `allow_other_workers=False`, `pure=False`);
values between sites travel through the orchestrator (results are gathered here and passed on as plain arguments, never
as futures: sites cannot reach each other and Dask would hang silently). A task for a dead or missing site fails within
its timeout with the site's name. Client, scheduler and worker versions are compared at connect. Everything started
here is stopped by PID on exit, also on failure and Ctrl-C.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import psutil
from distributed import Client, Future, wait
from distributed.client import FutureCancelledError

from fedsim_runner.backoff import delays, wait_until
from fedsim_runner.errors import RunFailed

log = logging.getLogger("fedsim.cluster")

# Packages whose versions must match across client, scheduler and workers for pickled tasks to mean the same thing.
CHECKED_PACKAGES = ("python", "dask", "distributed", "cloudpickle", "msgpack", "tornado", "toolz")
STOP_GRACE = 5.0  # seconds a process gets after SIGTERM before SIGKILL
LIVENESS_CAP = 0.5  # longest pause between two checks that the sites of pending tasks are still connected


class Site(Protocol):
    """What the cluster needs of a `SiteHandle` (fedsim_runner/sites)."""

    name: str
    address: str  # where the site's worker listens
    gateway: str  # how the site reaches the orchestrator


class Launcher(Protocol):
    """A site provider: runs a command AS the site (its namespaces, its user), environment exactly `env` + PATH/HOME."""

    def popen(self, site: str, argv: Sequence[str], env: Mapping[str, str], cwd: str | None = None) -> subprocess.Popen: ...


class StepRecorder(Protocol):
    def record_site_step(self, site: str, step: str, seconds: float) -> None: ...


class Cluster:
    """`with Cluster(run_log, sites, provider, log_dir=…) as cluster: cluster.run_on("site-a", fn, …)`.

    `provider` None means the workers are started elsewhere (the fedsim_dask role on VMs) and are only awaited; give
    them a fixed `port` then. `run_log` (a RunDir or anything with `record_site_step`) receives per-site task times.
    """

    def __init__(
        self,
        run_log: StepRecorder | None,
        sites: Iterable[Site],
        provider: Launcher | None = None,
        *,
        log_dir: Path | None = None,
        port: int = 0,
        connect_timeout: float = 60.0,
        task_timeout: float = 600.0,
        no_workers_timeout: float = 10.0,
        worker_ttl: float = 30.0,
        on_step: Callable[[str, str, float], None] | None = None,
    ) -> None:
        self.sites = {s.name: s for s in sites}
        if not self.sites:
            raise ValueError("a cluster needs at least one site")
        self.run_log = run_log
        self.provider = provider
        self.port = port
        self.connect_timeout = connect_timeout
        self.task_timeout = task_timeout
        self.no_workers_timeout = no_workers_timeout
        self.worker_ttl = worker_ttl
        self.on_step = on_step
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.log_dir = Path(log_dir) if log_dir else None
        self.scheduler: subprocess.Popen | None = None
        self.workers: dict[str, subprocess.Popen] = {}
        self.client: Client | None = None
        self.addresses: dict[str, str] = {}  # gateway address → scheduler address listening there
        self._logs: list[Any] = []

    # ---- lifecycle -------------------------------------------------------------------------------------------------
    def __enter__(self) -> Cluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Scheduler, then the site workers; returns once every site's worker is connected and versions agree."""
        started = time.monotonic()
        try:
            if self.log_dir is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="fedsim-dask-")
                self.log_dir = Path(self._tmp.name)
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._start_scheduler()
            if self.provider is not None:
                for site in self.sites.values():
                    self._start_worker(site)
            self._wait_for_workers()
            self._check_versions()
        except BaseException:
            self.stop()
            raise
        log.info("dask: scheduler and %d site workers ready in %.2f s", len(self.sites), time.monotonic() - started)

    def stop(self) -> None:
        """Close the client, stop the workers, then the scheduler: each by the PID started here (and its children)."""
        if self.client is not None:
            try:
                self.client.close(timeout=STOP_GRACE)
            except Exception as e:  # the scheduler may already be gone; stopping must go on
                log.debug("dask client close: %s", e)
            self.client = None
        _stop_trees({f"dask worker of site {name}": proc for name, proc in self.workers.items()})
        self.workers.clear()
        if self.scheduler is not None:
            _stop_trees({"dask scheduler": self.scheduler})
            self.scheduler = None
        for f in self._logs:
            f.close()
        self._logs.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
            self.log_dir = None

    def pids(self) -> list[int]:
        """PIDs of the processes this cluster started (scheduler first), for checks and the run log."""
        procs = ([self.scheduler] if self.scheduler else []) + list(self.workers.values())
        return [p.pid for p in procs]

    # ---- scheduler -------------------------------------------------------------------------------------------------
    def _start_scheduler(self) -> None:
        gateways = list(dict.fromkeys(["127.0.0.1", *(s.gateway for s in self.sites.values())]))
        interfaces = [_interface_of(g, self._sites_behind(g)) for g in gateways]
        n = len(gateways)
        scheduler_file = self.log_dir / "dask-scheduler.json"
        scheduler_file.unlink(missing_ok=True)
        argv = [
            sys.executable, "-m", "distributed.cli.dask_scheduler",
            "--interface", ",".join(interfaces),
            "--protocol", ",".join(["tcp"] * n),
            "--port", ",".join([str(self.port)] * n),
            "--no-dashboard", "--no-show",
            "--scheduler-file", str(scheduler_file),
        ]  # fmt: skip
        env = dict(os.environ)
        env.update(
            {
                # a task whose site has no worker fails instead of waiting forever (its error names the site)
                "DASK_DISTRIBUTED__SCHEDULER__NO_WORKERS_TIMEOUT": f"{self.no_workers_timeout}s",
                # a site whose link died without closing TCP is dropped after this long without a heartbeat
                "DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL": f"{self.worker_ttl}s",
                # site tasks are not idempotent (join, upload): never re-run one after its worker died
                "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0",
            }
        )
        out = self._log_file("dask-scheduler.log")
        # own session: a Ctrl-C at the terminal reaches only the orchestrator, which then stops workers before it
        self.scheduler = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
            start_new_session=True,
        )
        log.info("dask: scheduler pid %d listening on %s", self.scheduler.pid, ", ".join(interfaces))

        def ready() -> bool:
            if self.scheduler.poll() is not None:
                raise RunFailed(
                    f"dask scheduler exited with code {self.scheduler.returncode} before it was ready: "
                    f"{_tail(self.log_dir / 'dask-scheduler.log')}"
                )
            return scheduler_file.is_file() and scheduler_file.stat().st_size > 0

        if not wait_until(ready, self.connect_timeout):
            raise RunFailed(f"dask scheduler did not start within {self.connect_timeout:.0f} s; see {out.name}")
        self.client = Client(
            scheduler_file=str(scheduler_file), timeout=self.connect_timeout, set_as_default=False
        )
        listening = self.client.run_on_scheduler(_listener_addresses)
        for gateway in gateways:
            match = [a for a in listening if _host_of(a) == gateway]
            if not match:
                raise RunFailed(
                    f"dask scheduler does not listen on {gateway} (it listens on {', '.join(listening)}); "
                    f"give that link a single IPv4 address"
                )
            self.addresses[gateway] = match[0]

    def _sites_behind(self, gateway: str) -> str:
        return ", ".join(n for n, s in self.sites.items() if s.gateway == gateway) or "the orchestrator"

    def scheduler_address(self, site: str) -> str:
        """The scheduler's address as `site` reaches it (what its worker or the fedsim_dask role connects to)."""
        return self.addresses[self.sites[site].gateway]

    # ---- workers ---------------------------------------------------------------------------------------------------
    def _start_worker(self, site: Site) -> None:
        argv = [
            sys.executable, "-m", "fedsim_runner.site_worker",
            "--scheduler", self.scheduler_address(site.name),
            "--host", site.address,
            "--connect-timeout", str(self.connect_timeout),
        ]  # fmt: skip
        # Only what the worker needs: its credentials come from the site's own dotfile, read by the worker itself.
        proc = self.provider.popen(site.name, argv, {"PYTHONUNBUFFERED": "1"})
        self.workers[site.name] = proc
        log.info("dask: worker of site %s started (pid %d)", site.name, proc.pid)

    def _wait_for_workers(self) -> None:
        expected = set(self.sites)

        def all_connected() -> bool:
            for name, proc in self.workers.items():
                if proc.poll() is not None:
                    raise RunFailed(
                        f"site {name}: its dask worker exited with code {proc.returncode} before connecting: "
                        f"{self._worker_log_tail(name)}"
                    )
            return expected <= self.connected_sites()

        if not wait_until(all_connected, self.connect_timeout):
            missing = sorted(expected - self.connected_sites())
            raise RunFailed(
                f"dask workers of site(s) {', '.join(missing)} did not connect within {self.connect_timeout:.0f} s; "
                f"check that the site is up and reaches the scheduler at "
                f"{', '.join(sorted({self.scheduler_address(m) for m in missing}))}"
            )

    def _worker_log_tail(self, site: str) -> str:
        """The last line of the worker's output (the provider writes it to `<handle.logs>/<module>.log`)."""
        logs = getattr(self.sites[site], "logs", None)
        if logs is None:
            return "see the site's worker log"
        path = Path(logs) / "fedsim_runner.site_worker.log"
        return f"{_tail(path, lines=1)} (log: {path})"

    def connected_sites(self) -> set[str]:
        """Names of the site workers connected to the scheduler right now."""
        return set(self._workers().values())

    def _workers(self) -> dict[str, str]:
        """{worker address: site name}, asked of the scheduler itself: Client.scheduler_info() returns a cache that
        the client's periodic refresh (which fetches no workers) may overwrite between the fetch and the read, and
        live sites then looked gone."""
        info = self.client.sync(self.client.scheduler.identity, n_workers=-1)
        return {addr: str(w.get("name")) for addr, w in info["workers"].items()}

    def _check_versions(self) -> None:
        versions = self.client.get_versions(check=False)
        names = self._workers()
        ours = versions["client"]["packages"]
        others = {"scheduler": versions["scheduler"]["packages"]}
        others.update({f"site {names.get(a, a)}": v["packages"] for a, v in versions["workers"].items()})
        diffs = [
            f"{who} has {pkg} {pkgs.get(pkg)} (orchestrator: {ours.get(pkg)})"
            for who, pkgs in sorted(others.items())
            for pkg in CHECKED_PACKAGES
            if pkgs.get(pkg) != ours.get(pkg)
        ]
        if diffs:
            raise RunFailed(
                f"dask version mismatch: {'; '.join(diffs)}; install the same FedSim environment on every site "
                "(make venv locally, the fedsim_dask role on VMs)"
            )

    # ---- pinned submission ---------------------------------------------------------------------------------------
    def run_on(self, site: str, fn: Callable[..., Any], *args: Any, timeout: float | None = None,
               step: str | None = None, **kwargs: Any) -> Any:
        """Run `fn(*args, **kwargs)` on `site`'s worker and return its result here."""
        return self._run(fn, {site: (args, kwargs)}, timeout, step)[site]

    def run_on_all(self, fn: Callable[..., Any], per_site_args: Mapping[str, Sequence[Any]], *,
                   timeout: float | None = None, step: str | None = None, **kwargs: Any) -> dict[str, Any]:
        """Run `fn(*per_site_args[site], **kwargs)` on every listed site in parallel; {site: result}."""
        return self._run(fn, {s: (tuple(a), kwargs) for s, a in per_site_args.items()}, timeout, step)

    def _run(self, fn: Callable[..., Any], jobs: Mapping[str, tuple[tuple, dict]], timeout: float | None,
             step: str | None) -> dict[str, Any]:
        unknown = sorted(set(jobs) - set(self.sites))
        if unknown:
            raise ValueError(f"not a site of this cluster: {', '.join(unknown)}")
        step = step or getattr(fn, "__name__", "task")
        timeout = self.task_timeout if timeout is None else timeout
        tag = uuid.uuid4().hex[:8]
        submitted = time.monotonic()
        futures: dict[str, Future] = {}
        for site, (args, kwargs) in jobs.items():
            for a in (*args, *kwargs.values()):
                if isinstance(a, Future):
                    raise TypeError(f"{step}: pass values, not futures, to site {site} (DESIGN §7)")
            call = functools.partial(fn, **kwargs) if kwargs else fn
            fut = self.client.submit(
                call, *args, key=f"{step}-{site}-{tag}", workers=[site], allow_other_workers=False, pure=False
            )
            fut.add_done_callback(functools.partial(self._record_if_ok, site, step, submitted))
            futures[site] = fut
        try:
            self._wait_all(futures, step, timeout, submitted)
            results = self.client.gather(futures)
        finally:
            self.client.cancel([f for f in futures.values() if not f.done()])
        return results

    def _wait_all(self, futures: dict[str, Future], step: str, timeout: float, submitted: float) -> None:
        pending = dict(futures)
        deadline = submitted + timeout
        pauses = delays(0.005, cap=LIVENESS_CAP)
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RunFailed(
                    f"site(s) {', '.join(sorted(pending))}: {step} did not finish within {timeout:.0f} s"
                )
            try:
                with self.client.as_current():  # `wait` uses the current client; ours is not the process default
                    wait(list(pending.values()), timeout=min(next(pauses), remaining), return_when="FIRST_COMPLETED")
            except TimeoutError:
                pass
            for site, fut in list(pending.items()):
                if fut.done():
                    del pending[site]
                    if fut.status != "finished":
                        raise _task_failure(site, step, fut)
            if pending:
                gone = sorted(set(pending) - self.connected_sites())
                if gone:
                    raise RunFailed(
                        f"site(s) {', '.join(gone)}: the dask worker disconnected during {step}; "
                        "see the site's worker log"
                    )

    def _record_if_ok(self, site: str, step: str, submitted: float, fut: Future) -> None:
        """Done callback (in the client's thread, the moment the site finished): its time from submission to result."""
        if fut.status != "finished":
            return
        seconds = time.monotonic() - submitted
        if self.run_log is not None:
            self.run_log.record_site_step(site, step, seconds)
        if self.on_step is not None:
            self.on_step(site, step, seconds)
        log.debug("site %s: %s took %.3f s", site, step, seconds)

    # ---- helpers ---------------------------------------------------------------------------------------------------
    def _log_file(self, name: str):
        f = open(self.log_dir / name, "ab")  # noqa: SIM115 - closed in stop()
        self._logs.append(f)
        return f


def _task_failure(site: str, step: str, fut: Future) -> RunFailed:
    try:
        exc = fut.exception(timeout=STOP_GRACE)
    except FutureCancelledError:
        exc = None
    if exc is None:
        return RunFailed(f"site {site}: {step} was cancelled; its dask worker is gone")
    name = type(exc).__name__
    if name in ("KilledWorker", "NoValidWorkerError", "NoWorkerError"):
        return RunFailed(f"site {site}: {step} could not run, the site's dask worker is gone ({name})")
    text = str(exc)
    if isinstance(exc, RunFailed) and site in text:
        return RunFailed(text)
    return RunFailed(f"site {site}: {step} failed: {text if isinstance(exc, RunFailed) else f'{name}: {text}'}")


def _listener_addresses(dask_scheduler: Any) -> list[str]:
    """Runs in the scheduler: every address it listens on (one per link)."""
    return [listener.contact_address for listener in dask_scheduler.listeners]


def _host_of(address: str) -> str:
    return address.split("://", 1)[-1].rsplit(":", 1)[0]


def _interface_of(address: str, who: str) -> str:
    """The local network interface holding `address` (the scheduler listens per interface)."""
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family.name == "AF_INET" and a.address == address for a in addrs):
            return name
    raise RunFailed(
        f"{who}: reaches the orchestrator at {address}, which is not an address of this machine; "
        "bring the site up again (its link is missing)"
    )


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the orchestrator dies without cleaning up (e.g. SIGKILL)."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _stop_trees(procs: dict[str, subprocess.Popen]) -> None:
    """SIGTERM started processes and their descendants (a provider may wrap a worker in nsenter/su) all at once,
    wait, then SIGKILL what is left."""
    tree: list[psutil.Process] = []
    for proc in procs.values():
        try:
            root = psutil.Process(proc.pid)
            tree += [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    for p in tree:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(tree, timeout=STOP_GRACE)
    for p in alive:
        log.warning("pid %d ignored SIGTERM, killing it", p.pid)
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=STOP_GRACE)
    for what, proc in procs.items():
        try:
            proc.wait(timeout=STOP_GRACE)
        except subprocess.TimeoutExpired:
            log.error("%s: pid %d did not exit", what, proc.pid)


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:]) or "(empty log)"
