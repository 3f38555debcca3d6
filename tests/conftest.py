"""Shared test helpers. End-to-end tests start real processes; those needing root or chromium skip elsewhere."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
IS_ROOT = os.geteuid() == 0
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)

needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (network namespaces, mounts); CI runs as root")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (`make system` installs it)")


def free_port() -> int:
    """A TCP port on loopback that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def port() -> int:
    return free_port()
