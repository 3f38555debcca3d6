"""Vagrant sites: one VM per [[sites]] entry, defined by the repo's Vagrantfile from the project file.

The Vagrantfile asks this module for its settings (`python -m fedsim_runner.sites.vagrant PROJECT.toml` prints them
as JSON), so the project file is validated once, with the same messages and defaults as everywhere else. Each
project keeps its machines apart with its own VAGRANT_DOTFILE_PATH in the project's state folder. `up` runs
`vagrant up` (in parallel on libvirt; VirtualBox cannot) and saves `vagrant ssh-config`, from which the handles and the
inventory are made.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from fedsim_runner.config import REPO_ROOT, Config, load_config
from fedsim_runner.errors import ConfigError, RunFailed
from fedsim_runner.inventory import parse_ssh_config
from fedsim_runner.sites.base import Provider, SiteHandle
from fedsim_runner.sites.ssh import PORT_BASE, ssh_popen

VAGRANTFILE = REPO_ROOT / "Vagrantfile"


def vagrantfile_settings(cfg: Config) -> dict:
    """What the Vagrantfile needs: box, VM provider, memory, cpus and the sites with their private addresses."""
    p = cfg.provider
    if p.kind != "vagrant":
        raise ConfigError(f"{cfg.where('provider.kind')}: the Vagrantfile needs kind = \"vagrant\" (it is "
                          f"{p.kind!r}); set it in [provider]")
    return {"project": cfg.project.name, "box": p.box, "vm_provider": p.vm_provider, "memory": p.memory,
            "cpus": p.cpus, "sites": [{"name": s.name, "address": s.address} for s in cfg.sites]}


class VagrantProvider(Provider):
    kind = "vagrant"

    @property
    def ssh_config(self) -> Path:
        return self.state_dir / "ssh-config"

    def _env(self) -> dict[str, str]:
        return {**os.environ, "FEDSIM_CONFIG": str(self.cfg.path), "VAGRANT_CWD": str(REPO_ROOT),
                "VAGRANT_DOTFILE_PATH": str(self.state_dir / "vagrant"), "FEDSIM_PYTHON": sys.executable}

    def _vagrant(self, *args: str, log: str) -> str:
        if shutil.which("vagrant") is None:
            raise ConfigError(f"{self.cfg.where('provider.kind')}: vagrant is not installed; install it (`make system`) "
                              "or use kind = \"local\"")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["vagrant", *args], env=self._env(), cwd=REPO_ROOT, capture_output=True, text=True)
        (self.state_dir / log).write_text(r.stdout + r.stderr)
        if r.returncode != 0:
            reason = next((line.strip() for line in (r.stderr or r.stdout).splitlines() if line.strip()), "no output")
            raise RunFailed(f"vagrant {args[0]} failed: {reason} (full output: {self.state_dir / log})")
        return r.stdout

    def up(self) -> list[SiteHandle]:
        with self.locked():
            vm = self.cfg.provider.vm_provider
            parallel = "--parallel" if vm == "libvirt" else "--no-parallel"  # VirtualBox boots one VM at a time
            self._vagrant("up", f"--provider={vm}", parallel, log="vagrant-up.log")
            self.ssh_config.write_text(self._vagrant("ssh-config", log="vagrant-ssh-config.log"))
            self.write_state({"kind": self.kind, "project": self.project,
                              "sites": {h.name: h.to_json() for h in self.handles_from_ssh_config(self.ssh_config)}})
        return self.handles()

    def handles_from_ssh_config(self, path: Path) -> list[SiteHandle]:
        """Handles from saved `vagrant ssh-config` output (every site of the project must have a Host block)."""
        entries = parse_ssh_config(Path(path).read_text(), path)
        handles = []
        for s in self.cfg.sites:
            e = entries.get(s.name)
            if e is None:
                raise RunFailed(f"site {s.name}: no VM in `vagrant ssh-config`; is it up (`vagrant up {s.name}`)?")
            # the host's end of a private network is its .1 (libvirt and VirtualBox alike)
            gateway = str(ipaddress.ip_network(f"{s.address}/24", strict=False).network_address + 1)
            handles.append(SiteHandle(
                name=s.name, user=e.get("user", "vagrant"), home=Path("/home") / e.get("user", "vagrant"),
                home_in_site=f"/home/{e.get('user', 'vagrant')}",
                address=s.address, gateway=gateway, logs=self.state_dir / s.name / "logs", port_base=PORT_BASE,
                ssh_host=e.get("hostname"), ssh_port=int(e.get("port", 22)), ssh_user=e.get("user"),
                ssh_key=Path(e["identityfile"]) if "identityfile" in e else None))
        return handles

    def inventory(self, output: Path | None = None) -> Path:
        from fedsim_runner.inventory import write_inventory

        return write_inventory(self.cfg, output=output, vagrant_ssh_config=self.ssh_config)

    def popen(self, site: str | SiteHandle, argv: Sequence[str], env: Mapping[str, str] | None = None,
              cwd: str | None = None, user: bool = True, **popen_kwargs) -> subprocess.Popen:
        return ssh_popen(self.handle(site), Path(os.devnull), argv, env, cwd, **popen_kwargs)

    def down(self, keep_logs: bool = False) -> None:
        with self.locked():
            if (self.state_dir / "vagrant").exists():
                self._vagrant("destroy", "--force", log="vagrant-destroy.log")
            self.ssh_config.unlink(missing_ok=True)
            self.state_file.unlink(missing_ok=True)
            shutil.rmtree(self.state_dir / "vagrant", ignore_errors=True)
            if not keep_logs:
                for child in self.state_dir.iterdir():
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        if not keep_logs:
            try:
                self.state_dir.rmdir()
            except OSError:
                pass


def main(argv: list[str]) -> int:
    """Called by the Vagrantfile: print its settings as JSON, or one line on stderr and exit 2."""
    try:
        print(json.dumps(vagrantfile_settings(load_config(argv[0], check_files=False))))
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
