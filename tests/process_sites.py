"""Sites as plain processes for the cluster and site-task tests: each site its own HOME (holding its 0600 dotfile),
its own environment and its own processes. The same shape as the sites provider's process isolation."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass
class ProcessSite:
    name: str
    home: Path
    user: str = ""
    address: str = "127.0.0.1"
    gateway: str = "127.0.0.1"


class ProcessSites:
    def __init__(self, root: Path, dotfiles: dict[str, dict[str, str]]) -> None:
        """`dotfiles`: {site: {FC_USERNAME: …, …}}; FEDSIM_SITE is added."""
        self.handles = []
        for name, values in dotfiles.items():
            home = root / name
            (home / ".fedsim").mkdir(parents=True)
            dotfile = home / ".fedsim" / "site.env"
            dotfile.touch(mode=0o600)
            dotfile.write_text("".join(f"{k}={v}\n" for k, v in {"FEDSIM_SITE": name, **values}.items()))
            self.handles.append(ProcessSite(name, home))
        self.by_name = {h.name: h for h in self.handles}

    def popen(self, site: str, argv, env, cwd=None) -> subprocess.Popen:
        home = self.by_name[site].home
        kind = "worker" if "fedsim_runner.site_worker" in argv else "controller" if "controller" in argv else "process"
        with open(home / f"{kind}.log", "ab") as out:
            return subprocess.Popen(
                list(argv), env={**env, "PATH": os.environ["PATH"], "HOME": str(home)}, cwd=cwd or home,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )
