"""localfc, the offline FeatureCloud: the hub (website + relay), the controller and the app runtime.

The app store slug ↔ app folder mapping lives here, in one place: the hub seeds its store from it and the controller
finds the folder of a workflow step's app from the slug.
"""

from __future__ import annotations

import os
from pathlib import Path

from fedsim_runner.config import REPO_ROOT
from fedsim_runner.errors import ConfigError

APPS_DIR = REPO_ROOT / "apps"
# store slugs that are not simply the folder name with "_" → "-"
STORE_SLUGS = {"mean": "mean-app"}
# always in the store, even before their folders exist (FEATURECLOUD.md §5)
SEEDED_SLUGS = ("federated-svd", "mean-app")


def app_roots() -> list[Path]:
    """Folders holding app folders: apps/ plus each folder in $FEDSIM_EXTRA_APPS (os.pathsep-separated; tests)."""
    extra = [Path(p) for p in os.getenv("FEDSIM_EXTRA_APPS", "").split(os.pathsep) if p]
    return [APPS_DIR, *extra]


def slug_of(folder_name: str) -> str:
    """The store slug of an app folder: apps/federated_svd → federated-svd, apps/mean → mean-app."""
    return STORE_SLUGS.get(folder_name, folder_name.replace("_", "-"))


def app_folders() -> dict[str, Path]:
    """{slug: folder} of every app folder (one with a main.py) under the app roots; apps/ wins on a clash."""
    found: dict[str, Path] = {}
    for root in app_roots():
        if root.is_dir():
            for main in sorted(root.glob("*/main.py")):
                found.setdefault(slug_of(main.parent.name), main.parent)
    return found


def app_folder(slug: str) -> Path:
    """The folder of the app with this store slug; ConfigError naming the slug and where it looked."""
    folders = app_folders()
    if slug not in folders:
        roots = ", ".join(str(r) for r in app_roots())
        known = ", ".join(sorted(folders)) or "none"
        folder = {v: k for k, v in STORE_SLUGS.items()}.get(slug, slug.replace("-", "_"))
        raise ConfigError(f"app {slug!r}: no app folder with a main.py under {roots} (apps found: {known}); "
                          f"add the app as a folder named {folder!r} there")
    return folders[slug]


def store_slugs() -> list[str]:
    """Every slug the hub's app store lists: the seeded ones, then each app folder found."""
    return list(dict.fromkeys([*SEEDED_SLUGS, *sorted(app_folders())]))
