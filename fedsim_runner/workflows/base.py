"""What every workflow module provides, and the small helpers they share.

A workflow module (fedsim_runner/workflows/<name>.py) implements the `Workflow` protocol below; the registry in
`fedsim_runner/workflows/__init__.py` maps the workflow name to it. The orchestrator calls, in this order:
`params(cfg)` (validated app parameters) → `prepare(cfg, dataset, split)` (each site's input files) → the sites run the
app → `read_result(output_dir)` per site → `fedsim_runner.compare.evaluate(...)`, which calls `centralized(...)` and
`compare(...)` and writes `centralized/` and `comparison.json`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np
import yaml

from fedsim_runner.errors import ConfigError


class Workflow(Protocol):
    APP_SLUG: str  # the app's slug in the FeatureCloud app store (and in localfc's app list)
    DEFAULTS: dict[str, Any]  # the parameters `[workflow]` in the project file may set, with their defaults

    def params(self, cfg) -> dict[str, Any]: ...

    def prepare(self, cfg, dataset, split: dict[str, np.ndarray]) -> dict[str, dict[str, bytes]]: ...

    def read_result(self, output_dir: Path) -> dict[str, Any]: ...

    def centralized(self, dataset, params: dict[str, Any]) -> dict[str, Any]: ...

    def compare(self, federated: dict[str, dict], centralized: dict, split: dict[str, np.ndarray], **kw) -> dict: ...


def check_params(cfg, defaults: dict[str, Any], workflow: str) -> dict[str, Any]:
    """`[workflow]` from the project file merged over the defaults; unknown keys and wrong types are ConfigErrors."""
    given = dict(cfg.workflow or {})
    where = f"{cfg.path}: " if getattr(cfg, "path", None) else ""
    for key, value in given.items():
        if key not in defaults:
            raise ConfigError(
                f"{where}workflow.{key}: unknown parameter for the {workflow} workflow; use one of: "
                + ", ".join(sorted(defaults))
            )
        expected = defaults[key]
        ok = (
            isinstance(value, bool) == isinstance(expected, bool)
            and (isinstance(value, type(expected)) or (isinstance(expected, float) and isinstance(value, int)))
        ) or expected is None
        if not ok:
            raise ConfigError(
                f"{where}workflow.{key}: expected {type(expected).__name__} (like {expected!r}), got {value!r}; fix it"
            )
    return {**defaults, **given}


def yaml_bytes(document: dict) -> bytes:
    return yaml.safe_dump(document, sort_keys=False, default_flow_style=False).encode()


def find_output_file(output_dir: Path, name: str) -> Path | None:
    """`name` in an app's output folder; result zips sometimes nest it one or two folders deep."""
    output_dir = Path(output_dir)
    direct = output_dir / name
    if direct.is_file():
        return direct
    hits = sorted(output_dir.rglob(Path(name).name), key=lambda p: len(p.parts))
    return hits[0] if hits else None


def jsonable(value: Any) -> Any:
    """numpy values and arrays as plain Python, so a comparison can be written with json.dumps."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None if np.isnan(value) else str(value)
    if isinstance(value, Path):
        return str(value)
    return value
