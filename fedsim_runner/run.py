"""One run of a workflow, end to end (DESIGN §4): `python -m fedsim_runner svd|mean [options]`.

config → data split and each site's input → sites up → (localfc hub) → inventory → distribute.yml (data and each
site's OWN dotfile) → Dask cluster with a worker per site → accounts → FeatureCloud controllers → project, tokens,
joins, prepare, uploads, run, downloads (site tasks, each on its own site) → centralized reference and comparison →
report. Everything started is stopped again in reverse order, also on failure and Ctrl-C/SIGTERM; the run directory
keeps the logs whatever happens.
"""

from __future__ import annotations

import argparse
import copy
import io
import signal
import socket
import subprocess
import sys
import zipfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import toml
from rich.console import Console

from fedsim_runner import compare, data, report, site_tasks, workflows
from fedsim_runner.ansible import run_playbook
from fedsim_runner.backoff import wait_until
from fedsim_runner.cluster import Cluster
from fedsim_runner.config import (
    DEFAULT_CONFIGS,
    Config,
    check_data_files,
    ensure_local_credentials,
    load_config,
    load_credentials,
    parse_config,
)
from fedsim_runner.errors import ConfigError, RunFailed
from fedsim_runner.progress import RunProgress
from fedsim_runner.runlog import RunDir
from fedsim_runner.sites import get_provider

PHASES = ["sites", "hub", "distribute", "cluster", "accounts", "controllers", "project", "upload", "run",
          "download", "compare", "report"]
HUB_START_TIMEOUT = 60.0
STOP_GRACE = 10.0  # seconds a hub or controller gets after SIGTERM (it stops its app instances) before SIGKILL
CONTROLLER_LOG = "controller.log"
CONTROLLER_DATA = ".fedsim/controller"  # in the site's home: where the fedsim_featurecloud role, collect.yml and
# reset.yml look for the controller's state
console = Console(stderr=True)


# ---- configuration ---------------------------------------------------------------------------------------------------
def resolve_config(workflow: str, args: argparse.Namespace) -> Config:
    """The project file (default: the embedded one of the workflow) with the command line's overrides applied."""
    path = Path(args.config) if getattr(args, "config", None) else DEFAULT_CONFIGS[workflow]
    cfg = load_config(path, check_files=False)
    if cfg.project.workflow != workflow:
        raise ConfigError(f"{cfg.where('project.workflow')}: this file is for workflow {cfg.project.workflow!r}; "
                          f"run `python -m fedsim_runner {cfg.project.workflow} --config {path}`")
    original = cfg.model_dump(mode="json", exclude_none=True)
    doc = copy.deepcopy(original)
    overrides = {
        ("project", "platform"): getattr(args, "platform", None),
        ("project", "timing"): getattr(args, "timing", None),
        ("project", "outdir"): str(Path(args.outdir).resolve()) if getattr(args, "outdir", None) else None,
        ("data", "split"): getattr(args, "split", None),
        ("data", "source"): _dataset(args),
        ("provider", "isolation"): getattr(args, "isolation", None),
    }
    for (section, key), value in overrides.items():
        if value is not None:
            if section == "provider" and doc["provider"]["kind"] != "local":
                raise ConfigError(f"--{key}: only local sites have an isolation; provider is {doc['provider']['kind']}")
            doc[section][key] = value
    if getattr(args, "sites", None) is not None:
        doc["sites"] = _sites(doc["sites"], args.sites, doc["data"]["split"], cfg)
    # validate the changed document as if it were the file (its relative paths stay relative to the file's folder);
    # unchanged, the file itself stays, so that messages point at its lines
    changed = cfg if doc == original else parse_config(toml.dumps(doc), cfg.path)
    check_data_files(changed)
    return changed


def _dataset(args: argparse.Namespace) -> str | None:
    source = getattr(args, "dataset", None)
    if source and not (source.startswith("sklearn:") or source == "synthetic"):
        return str(Path(source).resolve())  # a file named on the command line is relative to the working folder
    return source


def _sites(sites: list[dict], n: int, split: str, cfg: Config) -> list[dict]:
    """`--sites N`: the file's first N sites, then generated ones (siteK, account siteK@fedsim.local)."""
    if n < 1:
        raise ConfigError(f"--sites {n}: a run needs at least one site")
    if split == "files" and n != len(sites):
        raise ConfigError(f"--sites {n}: split = \"files\" takes one site per data file ({len(sites)} in "
                          f"{cfg.path}); add [[sites]] entries there or choose another --split")
    kept = [dict(s) for s in sites[:n]]
    if not any(s.get("coordinator") for s in kept):
        kept[0]["coordinator"] = True
    names = {s["name"] for s in kept}
    users = {s["fc_user"] for s in kept}
    i = 0
    while len(kept) < n:
        i += 1
        name, user = f"site{i}", f"site{i}@fedsim.local"
        if name not in names and user not in users:
            kept.append({"name": name, "fc_user": user})
            names.add(name)
    return kept


def resolved_config_text(cfg: Config) -> str:
    """The run's configuration as TOML, paths absolute, no secrets (credentials are never in it)."""
    doc = cfg.model_dump(mode="json", exclude_none=True)
    doc["project"]["outdir"] = str(cfg.outdir)
    doc["project"]["credentials"] = str(cfg.resolve(cfg.project.credentials))
    for s in doc["sites"]:
        s["data"] = [str(cfg.resolve(Path(p))) for p in s.get("data", [])]
    if not (doc["data"]["source"].startswith("sklearn:") or doc["data"]["source"] == "synthetic"):
        doc["data"]["source"] = str(cfg.resolve(Path(doc["data"]["source"])))
    return f"# resolved configuration of this run (from {cfg.path})\n" + toml.dumps(doc)


# ---- the run ---------------------------------------------------------------------------------------------------------
def run_workflow(workflow: str, args: argparse.Namespace) -> int:
    """`python -m fedsim_runner <workflow>`: 0 when the federated result reproduces the centralized one, else 1."""
    cfg = resolve_config(workflow, args)
    wf = workflows.load(workflow)
    wf.params(cfg)  # parameter errors before anything starts
    dataset = data.load_dataset(cfg)
    names = [s.name for s in cfg.sites]
    split = data.split(dataset, cfg, names)
    inputs = wf.prepare(cfg, dataset, split)
    ensure_local_credentials(cfg)
    credentials = load_credentials(cfg)

    with _Interruptible() as interrupt:
        with RunDir.create(cfg.outdir, workflow) as run, RunProgress(PHASES, names, console) as progress:
            run.add_secrets(credentials.values())
            run.write_text("config.toml", resolved_config_text(cfg))
            for site, files in inputs.items():
                for name, content in files.items():
                    target = run.path / "sites" / site / "input" / name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(content)
            console.print(f"run directory {run.path}", highlight=False, soft_wrap=True)
            runner = Run(cfg, workflow, run, progress, credentials, keep_sites=bool(getattr(args, "keep", False)))
            try:
                comparison = runner.execute(dataset, split)
            except RunFailed as e:  # what broke because of the interrupt (a service stopping) is not the news
                if interrupt.received:
                    raise KeyboardInterrupt(f"signal {interrupt.received}") from e
                raise
            run.add_metric("passed", bool(comparison.get("passed")))
            report.write_report(run.path, comparison, run.metrics, cfg)
            progress.finish("done" if comparison.get("passed") else "comparison failed")
    console.print(report.summary_table(comparison))
    console.print(f"report: {run.path / 'report.html'}", highlight=False, soft_wrap=True)
    if not comparison.get("passed"):
        console.print("[red]the federated result does not reproduce the centralized one[/red] "
                      "(see comparison.json)", highlight=False)
        return 1
    return 0


class _Interruptible:
    """Ctrl-C and SIGTERM (`kill`) end the run as KeyboardInterrupt: the first one starts the clean-up, later ones
    are only logged, so that the clean-up itself is never cut short (nothing may be left behind)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
            raise KeyboardInterrupt(f"signal {signum}")
        console.print("[yellow]stopping everything the run started, please wait[/yellow]")

    def __enter__(self) -> _Interruptible:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Run:
    """DESIGN §4 steps 2–6 for one configuration; `execute` stops everything it started whatever happens."""

    def __init__(self, cfg: Config, workflow: str, run: RunDir, progress: RunProgress,
                 credentials: dict[str, str], keep_sites: bool = False) -> None:
        self.cfg, self.workflow, self.run, self.progress = cfg, workflow, run, progress
        self.credentials = credentials
        self.keep_sites = keep_sites
        self.log = run.log
        self.wf = workflows.load(workflow)
        self.params = self.wf.params(cfg)
        self.coordinator = cfg.coordinator.name
        self.names = [s.name for s in cfg.sites]
        self.local_platform = cfg.project.platform == "local"
        self.provider = get_provider(cfg)
        self.handles: dict[str, Any] = {}
        self.hub_url: str | None = None  # as the orchestrator reaches it

    def phase(self, name: str):
        self.progress.phase(name)
        return self.run.phase(name)

    def execute(self, dataset, split) -> dict:
        with ExitStack() as stack:
            stack.callback(self._down)
            with self.phase("sites"):
                self.handles = {h.name: h for h in self.provider.up()}
            self.run.add_metric("isolation", self.provider.kind)
            stack.callback(self._collect_site_logs)
            if self.local_platform:
                with self.phase("hub"):
                    stack.enter_context(self._hub())
            with self.phase("distribute"):
                self._distribute(self.run.path / "sites")
            with self.phase("cluster"):
                cluster = stack.enter_context(Cluster(
                    self.run, self.handles.values(), self.provider, log_dir=self.run.path / "dask",
                    task_timeout=self.cfg.project.timeout, on_step=self.progress.on_step))
            with self.phase("accounts"):
                logins = cluster.run_on_all(site_tasks.ensure_account, {n: (self.local_platform,) for n in self.names})
                self.log.info("logged in: %s", ", ".join(f"{s} as {v['user']}" for s, v in logins.items()))
            with self.phase("controllers"):
                self._start_controllers(stack)
            federated = self._federated_run(cluster)
            reference = self._reference_run(cluster, dataset) if self.params.get("reference_run") else None
        with self.phase("compare"):
            comparison = compare.evaluate(self.workflow, self.cfg, dataset, split, federated, self.run.path,
                                          reference=reference)
        self.progress.phase("report")
        return comparison

    # ---- services -----------------------------------------------------------------------------------------------------
    def _hub(self):
        """localfc's hub as a process of the orchestrator, listening on loopback and on every site's gateway."""
        port = _free_port()
        hosts = sorted({"127.0.0.1", *(h.gateway for h in self.handles.values())})
        log_file = self.run.path / "hub.log"
        argv = [sys.executable, "-m", "fedsim_runner", "hub", *(a for h in hosts for a in ("--host", h)),
                "--port", str(port), "--db", str(self.run.path / "hub.sqlite3")]
        with open(log_file, "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.hub_port, self.hub_url = port, f"http://127.0.0.1:{port}"
        stack = ExitStack()
        stack.callback(_stop, proc, "hub", self.log)

        def up() -> bool:
            if proc.poll() is not None:
                raise RunFailed(f"localfc hub exited with code {proc.returncode}: {_tail(log_file)}")
            try:
                return httpx.get(f"{self.hub_url}/api/apps/", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        try:
            if not wait_until(up, HUB_START_TIMEOUT):
                raise RunFailed(f"localfc hub did not answer within {HUB_START_TIMEOUT:.0f} s; see {log_file}")
        except BaseException:
            stack.close()
            raise
        self.log.info("localfc hub on %s, port %d (pid %d)", ", ".join(hosts), port, proc.pid)
        return stack

    def _distribute(self, inputs: Path, limit: str | None = None) -> None:
        """distribute.yml: each site's `inputs/<site>/input/*` into its ~/input, and its own dotfile."""
        inventory = self.run.path / "inventory.yml"
        if not inventory.exists():
            self.provider.inventory(inventory)
        extravars: dict[str, Any] = {"fedsim_input_root": str(inputs)}
        if self.local_platform:
            extravars["fedsim_fc_hub_port"] = self.hub_port
        elif self.cfg.base_url:
            extravars["fedsim_fc_base_url"] = self.cfg.base_url
        run_playbook("distribute", inventory, extravars, self.run, {"fedsim_credentials": self.credentials},
                     progress=self.progress, limit=limit)

    def _start_controllers(self, stack: ExitStack) -> None:
        """Each site's FeatureCloud controller, started AS the site with its own dotfile loaded (localfc), or
        `featurecloud controller start` on the sites through services.yml (featurecloud.ai)."""
        if not self.local_platform:
            inventory = self.run.path / "inventory.yml"
            # the controllers only: the run's own Cluster is the Dask of this run
            started = {"fedsim_services_state": "started", "fedsim_services_dask": False}
            run_playbook("services", inventory, started, self.run, progress=self.progress)
            stack.callback(run_playbook, "services", inventory, {**started, "fedsim_services_state": "stopped"},
                           self.run)
            return
        py = sys.executable
        for name, h in self.handles.items():
            hub = f"http://{h.gateway}:{self.hub_port}"
            argv = [py, "-m", "fedsim_runner.site_env", "--", py, "-m", "fedsim_runner", "controller", "--site", name,
                    "--hub", hub, "--host", h.address, "--port", str(h.port_base),
                    "--data-dir", f"{h.home_in_site}/{CONTROLLER_DATA}", "--timing", self.cfg.project.timing]
            with open(Path(h.logs) / CONTROLLER_LOG, "ab") as out:
                proc = self.provider.popen(name, argv, {"PYTHONUNBUFFERED": "1"}, stdout=out, stderr=subprocess.STDOUT)
            stack.callback(_stop, proc, f"controller of {name}", self.log)
            self.log.info("site %s: controller on %s:%d (hub %s)", name, h.address, h.port_base, hub)

    # ---- the FeatureCloud project -------------------------------------------------------------------------------------
    def _federated_run(self, cluster: Cluster) -> dict[str, dict]:
        """DESIGN §4 step 4 across every site; each site's parsed result."""
        folder = self.run.path / "sites"
        self._project_run(cluster, self.names, f"{self.cfg.project.name}-{self.run.path.name}", folder,
                          reuse=self.cfg.project.project_id)
        return {site: self.wf.read_result(folder / site / "output") for site in self.names}

    def _reference_run(self, cluster: Cluster, dataset) -> dict:
        """fedflow's reference (svd `reference_run`): the same app with the coordinator alone holding every sample,
        after the federated run; its input reaches the coordinator only (distribute.yml limited to it)."""
        coord, folder = self.coordinator, self.run.path / "reference"
        files = self.wf.prepare(self.cfg, dataset, self.wf.single_site_split(dataset, coord))[coord]
        for name, content in files.items():
            target = folder / coord / "input" / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
        with self.phase("reference distribute"):
            self._distribute(folder, limit=coord)
        self._project_run(cluster, [coord], f"{self.cfg.project.name}-{self.run.path.name}-reference", folder,
                          phase_prefix="reference ")
        return self.wf.read_result(folder / coord / "output")

    def _project_run(self, cluster: Cluster, sites: list[str], name: str, folder: Path, reuse: int | None = None,
                     phase_prefix: str = "") -> None:
        """Project (new, or `reuse`d with its members), tokens and joins, prepare, uploads, run, downloads into
        `folder/<site>/{output,logs}`; RunFailed naming the failing site unless the project finished."""
        slug, coord = self.wf.APP_SLUG, self.coordinator
        participants = [n for n in sites if n != coord]
        with self.phase(phase_prefix + "project"):
            pid = reuse
            if pid is None:
                pid = cluster.run_on(coord, site_tasks.create_project, name, slug)
                tokens = cluster.run_on(coord, site_tasks.create_tokens, pid, len(participants))
                if participants:
                    cluster.run_on_all(site_tasks.join, dict(zip(participants, [(t,) for t in tokens], strict=True)))
            else:  # a persistent project: its members joined once, before
                cluster.run_on(coord, site_tasks.set_status, pid, "ready")
            cluster.run_on(coord, site_tasks.set_status, pid, "prepare")
            self.run.add_metric(_key(phase_prefix, "project_id"), pid)
            self.log.info("project %d: %s, coordinator %s, %d participants", pid, slug, coord, len(participants))
        with self.phase(phase_prefix + "upload"):
            uploaded = cluster.run_on_all(site_tasks.upload_and_finalise, {n: (pid, "input") for n in sites})
            self.run.add_metric(_key(phase_prefix, "uploaded_bytes"), {s: u["bytes"] for s, u in uploaded.items()})
        with self.phase(phase_prefix + "run"):
            # every site watches the project (as each participant does on FeatureCloud): a site whose worker dies
            # is named at once instead of when the run is over; the coordinator's view decides
            timeout = self.cfg.project.timeout
            statuses = cluster.run_on_all(site_tasks.wait_for_final_status, {n: (pid, timeout) for n in sites},
                                          timeout=timeout + 60)
            status = statuses[coord]
            self.log.info("project %d ended %s", pid, status)
            self.run.add_metric(_key(phase_prefix, "project_status"), status)
        with self.phase(phase_prefix + "download"):
            ok = status == "finished"
            files = cluster.run_on_all(site_tasks.download_results, {n: (pid, 60.0, ok) for n in sites})
            for site, found in files.items():
                self._store_results(folder / site, site, found)
        if not ok:
            raise RunFailed(self._failure(pid, status, folder, sites))

    def _store_results(self, folder: Path, site: str, found: dict[str, bytes]) -> None:
        """Result zips into <folder>/output (kept and extracted), step logs into <folder>/logs and fedsim.log."""
        out, logs = folder / "output", folder / "logs"
        out.mkdir(parents=True, exist_ok=True)
        logs.mkdir(parents=True, exist_ok=True)
        for name, content in sorted(found.items()):
            if name.endswith(".zip"):
                (out / name).write_bytes(content)
                with zipfile.ZipFile(io.BytesIO(content)) as z:
                    z.extractall(out / name.removesuffix(".zip"))
            else:
                text = self.run.redactor.redact(content.decode("utf-8", "replace"))
                (logs / name).write_text(text)
                self.run.append_site_log(site, name, text)

    def _failure(self, pid: int, status: str, folder: Path, sites: list[str]) -> str:
        """Which site's app failed and how, from the step logs the sites downloaded (its own failure first)."""
        reasons = {}
        for site in sites:
            for log in sorted((folder / site / "logs").glob("logs_*.txt")):
                lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
                closing = [ln for ln in lines if "run ended in error:" in ln]
                if closing:
                    reasons[site] = closing[-1].split("run ended in error:", 1)[1].strip()
                    errors = [ln for ln in lines if ln.startswith(("Traceback", "ValueError", "Error", "Exception"))
                              or "Error:" in ln]
                    if errors:
                        reasons[site] += f" ({errors[-1][:300]})"
        own = {s: r for s, r in reasons.items() if not r.startswith(_STOPPED_BY_OTHERS)}
        shown = own or reasons
        if not shown:
            return f"project {pid} ended {status!r}; see the sites' logs in {folder}"
        detail = "; ".join(f"site {s}: {r}" for s, r in shown.items())
        return f"project {pid} ended {status!r}: {detail}"

    # ---- clean-up -------------------------------------------------------------------------------------------------------
    def _collect_site_logs(self) -> None:
        """The logs site processes wrote (controller, Dask worker) into sites/<site>/logs and fedsim.log."""
        for name, h in self.handles.items():
            target = self.run.path / "sites" / name / "logs"
            for path in sorted(Path(h.logs).glob("*.log")) if Path(h.logs).is_dir() else []:
                text = self.run.redactor.redact(path.read_text(errors="replace"))
                target.mkdir(parents=True, exist_ok=True)
                (target / path.name).write_text(text)
                self.run.append_site_log(name, path.stem, text)

    def _down(self) -> None:
        if self.keep_sites:
            self.log.info("sites kept running (--keep); stop them with `python -m fedsim_runner down --config %s`",
                          self.cfg.path)
            return
        with self.run.phase("down"):
            self.provider.down()


_STOPPED_BY_OTHERS = ("project ", "stopped", "the hub")


def _key(prefix: str, name: str) -> str:
    """metrics.json key of a project's number: `project_id`, or `reference_project_id` for the reference run."""
    return (prefix.strip() + "_" if prefix.strip() else "") + name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, what: str, log) -> None:
    """SIGTERM (the process stops what it started), then SIGKILL after STOP_GRACE seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_GRACE)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0f s after SIGTERM; killing it", what, STOP_GRACE)
            proc.kill()
            proc.wait(timeout=STOP_GRACE)
    log.info("%s stopped (exit code %s)", what, proc.returncode)


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


