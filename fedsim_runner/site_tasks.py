"""What a participant does, as plain functions the orchestrator runs on the participant's own site (Dask worker).

Each function reads the site's credentials with `os.getenv` (the site worker loaded the site's own dotfile, DESIGN §10)
and returns only JSON-able, non-secret values: ids, statuses, project tokens, file names and bytes.
"""

from __future__ import annotations

import getpass
import os
import socket


def site_identity() -> dict:
    """Who and where this task runs: the site's name from its dotfile, unix user, hostname, PID and home."""
    return {
        "site": os.getenv("FEDSIM_SITE"),
        "user": getpass.getuser(),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "home": os.path.expanduser("~"),
    }
