"""Process sites from the real provider for the cluster and site-task tests, each with its own 0600 dotfile written
the way distribute.yml writes it: by the site's user, into its own home, the secret passed on stdin."""

from __future__ import annotations

import contextlib
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

from fedsim_runner.config import parse_config
from fedsim_runner.sites import Provider, SiteHandle, get_provider


def write_dotfile(provider: Provider, site: str, values: dict[str, str]) -> None:
    proc = provider.popen(site, ["sh", "-c", "umask 077 && mkdir -p ~/.fedsim && cat > ~/.fedsim/site.env"], {},
                          stdin=subprocess.PIPE)
    proc.communicate("".join(f"{k}={v}\n" for k, v in {"FEDSIM_SITE": site, **values}.items()).encode(), timeout=30)
    assert proc.returncode == 0


@contextlib.contextmanager
def process_sites(folder: Path, dotfiles: dict[str, dict[str, str]]) -> Iterator[tuple[Provider, dict[str, SiteHandle]]]:
    """`dotfiles`: {site: {FC_USERNAME: …, …}} (FEDSIM_SITE is added); yields (provider, {site: handle})."""
    text = f'[project]\nname = "fedsim-test-{uuid.uuid4().hex[:8]}"\nworkflow = "mean"\n' \
           '[provider]\nkind = "local"\nisolation = "process"\n'
    for i, name in enumerate(dotfiles):
        text += f'[[sites]]\nname = "{name}"\nfc_user = "{name}@fedsim.test"\ncoordinator = {str(i == 0).lower()}\n'
    provider = get_provider(parse_config(text, folder / "project.toml"))
    try:
        handles = {h.name: h for h in provider.up()}
        for name, values in dotfiles.items():
            write_dotfile(provider, name, values)
        yield provider, handles
    finally:
        provider.down()
