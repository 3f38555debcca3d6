"""Command line: `python -m fedsim_runner <command>` (also installed as `fedsim`).

Exit codes: 0 ok, 1 the run failed, 2 usage or configuration error (one line, no traceback).
Each command imports its module on demand so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from fedsim_runner.errors import ConfigError, RunFailed
from fedsim_runner.workflows import WORKFLOWS

console = Console(stderr=True)


def _workflow(args: argparse.Namespace) -> int:
    from fedsim_runner.run import run_workflow

    return run_workflow(args.command, args)


def _init(args: argparse.Namespace) -> int:
    from fedsim_runner.template import render_template

    sys.stdout.write(render_template(args.workflow))
    return 0


def _validate(args: argparse.Namespace) -> int:
    from fedsim_runner import workflows
    from fedsim_runner.config import credentials_path, load_config, load_credentials

    cfg = load_config(args.file)
    workflows.load(cfg.project.workflow).params(cfg)
    creds = args.credentials or credentials_path(cfg)
    if args.credentials or creds.exists() or cfg.project.platform != "local":
        load_credentials(cfg, creds)
        note = f"credentials for every site in {creds}"
    else:  # localfc accounts are FedSim's own: the first run creates the file
        note = f"{creds} will be created with random passwords at the first run"
    console.print(f"[green]ok[/green] {args.file}: workflow {cfg.project.workflow}, {len(cfg.sites)} sites, "
                  f"coordinator {cfg.coordinator.name}; {escape(note)}", highlight=False, soft_wrap=True)
    return 0


def _inventory(args: argparse.Namespace) -> int:
    from fedsim_runner.config import load_config
    from fedsim_runner.inventory import write_inventory

    cfg = load_config(args.config)
    handles = None
    if cfg.provider.kind == "local":  # local sites exist only while up: ask their provider
        from fedsim_runner.sites import get_provider

        handles = get_provider(cfg).handles()
    out = write_inventory(cfg, output=args.output, vagrant_ssh_config=args.vagrant_ssh_config, handles=handles)
    console.print(f"inventory written to {escape(str(out))}", highlight=False, soft_wrap=True)
    return 0


def _hub(args: argparse.Namespace) -> int:
    from fedsim_runner.localfc.hub import serve

    serve(hosts=args.host or ["127.0.0.1"], port=args.port, db=args.db)
    return 0


def _controller(args: argparse.Namespace) -> int:
    from fedsim_runner.localfc.controller import serve

    serve(site=args.site, hub=args.hub, host=args.host, port=args.port, data_dir=args.data_dir, timing=args.timing)
    return 0


def _sites(args: argparse.Namespace) -> int:
    from fedsim_runner.sites import command

    return command(args.command, args)


def _logs(args: argparse.Namespace) -> int:
    from fedsim_runner.runlog import show_logs

    return show_logs(args.run, site=args.site, grep=args.grep)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedsim",
        description="Run federated analyses on FeatureCloud across isolated sites and compare them with the "
        "centralized analysis.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for name in WORKFLOWS:
        w = sub.add_parser(name, help=f"run the {name} workflow end to end and compare it with the centralized result")
        w.add_argument("--config", type=Path, help=f"project file (default: resources/config_{name}.toml)")
        w.add_argument("--sites", type=int, help="number of sites (overrides the project file)")
        w.add_argument("--split", choices=["iid", "label-skew", "size-skew", "files"], help="how data is split")
        w.add_argument("--dataset", help="sklearn:<name>, synthetic, or a CSV/TSV file")
        w.add_argument("--isolation", choices=["auto", "namespace", "process"], help="local site isolation")
        w.add_argument("--platform", choices=["local", "featurecloud"], help="localfc or featurecloud.ai")
        w.add_argument("--timing", choices=["fast", "realistic"], help="engine waits and query interval")
        w.add_argument("--outdir", type=Path, help="parent folder of the run directory")
        w.add_argument("--keep", action="store_true", help="leave the sites up after the run (remove them with `down`); hub, controllers and workers always stop")
        w.set_defaults(func=_workflow)

    i = sub.add_parser("init", help="print a commented project file template")
    i.add_argument("--workflow", choices=sorted(WORKFLOWS), default="svd")
    i.set_defaults(func=_init)

    v = sub.add_parser("validate", help="check a project file (and its credentials file when present)")
    v.add_argument("file", type=Path)
    v.add_argument("--credentials", type=Path, help="operator credentials file (default: project.credentials)")
    v.set_defaults(func=_validate)

    inv = sub.add_parser("inventory", help="write the Ansible inventory for a project file")
    inv.add_argument("--config", type=Path, required=True)
    inv.add_argument("--vagrant-ssh-config", type=Path, help="saved output of `vagrant ssh-config`")
    inv.add_argument("--output", type=Path, help="inventory file (default: inventory/<project>.yml)")
    inv.set_defaults(func=_inventory)

    for name, text in [
        ("up", "create the project's sites (local namespaces/processes, vagrant VMs, or check ssh hosts)"),
        ("provision", "run site.yml on the project's sites"),
        ("down", "stop services and remove the project's sites"),
    ]:
        s = sub.add_parser(name, help=text)
        s.add_argument("--config", type=Path, required=True)
        if name == "down":
            s.add_argument("--keep-logs", action="store_true", help="keep the sites' log folders")
        s.set_defaults(func=_sites)

    h = sub.add_parser("hub", help="run the localfc hub (offline featurecloud.ai: REST API, web GUI, relay)")
    h.add_argument("--host", action="append", help="address to listen on (repeat for several; default 127.0.0.1)")
    h.add_argument("--port", type=int, default=8080)
    h.add_argument("--db", type=Path, default=Path("localfc-hub.sqlite3"))
    h.set_defaults(func=_hub)

    c = sub.add_parser("controller", help="run a localfc controller for one site (credentials from the environment)")
    c.add_argument("--site", required=True)
    c.add_argument("--hub", required=True, help="hub base URL, e.g. http://127.0.0.1:8080")
    c.add_argument("--host", default="127.0.0.1")
    c.add_argument("--port", type=int, default=8000)
    c.add_argument("--data-dir", type=Path, default=Path("data"))
    c.add_argument("--timing", choices=["fast", "realistic"], default="realistic")
    c.set_defaults(func=_controller)

    lg = sub.add_parser("logs", help="show the collected logs of a run directory")
    lg.add_argument("run", type=Path)
    lg.add_argument("--site")
    lg.add_argument("--grep")
    lg.set_defaults(func=_logs)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except ConfigError as e:
        console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        return 2
    except RunFailed as e:
        console.print(f"[red]run failed:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]: everything started was stopped")
        return 1
