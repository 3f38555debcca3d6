"""Site providers: where the sites of a project run (this machine, Vagrant VMs, existing SSH hosts), and the CLI's
`up`, `provision` and `down`.

`get_provider(cfg)` picks the provider from `[provider]`: kind `local` with isolation `namespace` (root), `process`
or `auto` (namespace when root and the kernel allows it, else process), `vagrant`, or `ssh`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from fedsim_runner.config import Config, load_config
from fedsim_runner.sites.base import Provider, SiteHandle, state_root

__all__ = ["Provider", "SiteHandle", "command", "get_provider", "namespace_supported"]
console = Console(stderr=True)


def namespace_supported() -> bool:
    """Root, the util-linux/iproute2 tools and overlayfs: what namespace sites need."""
    from fedsim_runner.sites.namespace import SSHD, TOOLS

    try:
        overlay = "overlay" in Path("/proc/filesystems").read_text()
    except OSError:
        overlay = False
    return os.geteuid() == 0 and overlay and Path(SSHD).exists() and all(shutil.which(t) for t in TOOLS)


def get_provider(cfg: Config) -> Provider:
    kind = cfg.provider.kind
    if kind == "vagrant":
        from fedsim_runner.sites.vagrant import VagrantProvider

        return VagrantProvider(cfg)
    if kind == "ssh":
        from fedsim_runner.sites.ssh import SshProvider

        return SshProvider(cfg)
    isolation = cfg.provider.isolation
    if isolation == "auto":  # sites that are up keep the isolation they were made with
        try:
            isolation = json.loads((state_root() / cfg.project.name / "sites.json").read_text())["kind"]
        except (OSError, ValueError, KeyError):
            isolation = "namespace" if namespace_supported() else "process"
    if isolation == "namespace":
        from fedsim_runner.sites.namespace import NamespaceProvider

        return NamespaceProvider(cfg)
    from fedsim_runner.sites.process import ProcessProvider

    return ProcessProvider(cfg)


def command(name: str, args: argparse.Namespace) -> int:
    """`up`, `provision` and `down --config FILE`."""
    cfg = load_config(args.config)
    provider = get_provider(cfg)
    if name == "down":
        provider.down(keep_logs=args.keep_logs)
        console.print(f"sites of {escape(cfg.project.name)} removed ({provider.kind})", highlight=False)
        return 0
    if name == "up":
        handles = provider.up()
        for h in handles:
            console.print(f"  {h.name}: {h.address}" + (f" (ssh {h.ssh_user}@{h.ssh_host})" if h.ssh_host else ""),
                          highlight=False)
        console.print(f"{len(handles)} sites up ({provider.kind}); inventory {escape(str(provider.inventory()))}",
                      highlight=False, soft_wrap=True)
        return 0
    if name == "provision":
        from fedsim_runner.ansible import run_playbook

        stats = run_playbook("site.yml", provider.inventory())
        changed = sum((stats.get("changed") or {}).values())
        console.print(f"site.yml done on {len(cfg.sites)} sites ({changed} changes)", highlight=False)
        return 0
    raise ValueError(f"unknown sites command {name}")
