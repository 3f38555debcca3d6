"""Run a program with the site's own credentials: `python -m fedsim_runner.site_env -- PROGRAM ARGS…`.

The orchestrator starts site services (Dask worker, localfc controller) through this wrapper so that it never holds a
site's password: the wrapper runs as the site's user, reads the site's dotfile (DESIGN §10) into its own environment and
replaces itself with the program.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from dotenv import dotenv_values

REQUIRED = ("FEDSIM_SITE", "FC_USERNAME", "FC_PASSWORD", "FC_BASE_URL", "FC_CONTROLLER_URL")


def dotfile_path() -> Path:
    return Path(os.environ.get("FEDSIM_SITE_ENV") or Path.home() / ".fedsim" / "site.env")


def load_site_env(path: Path | None = None) -> dict[str, str]:
    path = path or dotfile_path()
    values = {k: v for k, v in dotenv_values(path).items() if v is not None}
    missing = [k for k in REQUIRED if not values.get(k)]
    if missing:
        raise SystemExit(f"{path}: missing {', '.join(missing)}; run distribute.yml for this site")
    return values


def main(argv: list[str]) -> None:
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        raise SystemExit("usage: python -m fedsim_runner.site_env -- PROGRAM [ARGS…]")
    os.environ.update(load_site_env())
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
