"""Mean (app `mean-app`, FEATURECLOUD.md §5): one line of numbers per site; the app returns the mean of local means.

The comparison reports both the value the app is meant to compute (the mean of the sites' local means, computed
here from the same split) and the pooled mean, which differs whenever sites hold different numbers of samples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fedsim_runner.errors import ConfigError, RunFailed
from fedsim_runner.workflows.base import check_params, find_output_file, yaml_bytes

APP_SLUG = "mean-app"
INPUT_FILE = "data.csv"
OUTPUT_FILE = "output.csv"

DEFAULTS: dict[str, Any] = {
    "column": None,  # which feature of a multi-feature dataset the sites average: index or name (default: the first)
    "tolerance": 1e-9,  # passes when the app's value equals the mean of local means within this (absolute)
}


def params(cfg) -> dict[str, Any]:
    p = check_params(cfg, DEFAULTS, "mean")
    if not isinstance(p["column"], int | str | type(None)) or isinstance(p["column"], bool):
        raise ConfigError(f"{cfg.path}: workflow.column: use a feature index (0, 1, …) or a feature name")
    return p


def _column_index(dataset, column) -> int:
    if column is None:
        return 0
    if isinstance(column, int):
        if not 0 <= column < dataset.n_features:
            raise ConfigError(f"workflow.column = {column}: {dataset.name} has features 0..{dataset.n_features - 1}")
        return column
    if column not in dataset.feature_names:
        raise ConfigError(f"workflow.column = {column!r}: no such feature in {dataset.name}; use one of its names")
    return dataset.feature_names.index(column)


def read_site_file(path: Path, id_prefix: str):
    """A site's own data.csv for split "files": comma-separated numbers (one line, or several)."""
    from fedsim_runner.data import Dataset

    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the data file ({e.strerror}); fix the path") from None
    values: list[float] = []
    for number, line in enumerate(lines, start=1):
        for field in (f.strip() for f in line.split(",")):
            if not field:
                continue
            try:
                values.append(float(field))
            except ValueError:
                raise ConfigError(
                    f"{path}:{number}: {field!r} is not a number; the mean app reads comma-separated numbers"
                ) from None
    if not values:
        raise ConfigError(f"{path}: no numbers; write one comma-separated line such as 1,2,3")
    ids = [f"{id_prefix}_{i}" for i in range(len(values))]
    return Dataset(str(path), np.asarray(values, dtype=float)[:, None], ids, ["value"])


def prepare(cfg, dataset, split: dict[str, np.ndarray]) -> dict[str, dict[str, bytes]]:
    col = _column_index(dataset, params(cfg)["column"])
    config = yaml_bytes({"fc_mean": {"input_name": INPUT_FILE, "output_name": OUTPUT_FILE}})
    files = {}
    for site, rows in split.items():
        line = ",".join(repr(float(v)) for v in dataset.X[rows, col])
        files[site] = {INPUT_FILE: (line + "\n").encode(), "config.yml": config}
    return files


def read_result(output_dir: Path) -> dict[str, Any]:
    output_dir = Path(output_dir)
    name = OUTPUT_FILE
    copied = find_output_file(output_dir, "config.yml")
    if copied:
        try:
            name = (yaml.safe_load(copied.read_text()) or {}).get("fc_mean", {}).get("output_name") or name
        except yaml.YAMLError:
            pass  # a damaged copy of our own config: the name is the one we asked for
    path = find_output_file(output_dir, name)
    if path is None:
        raise RunFailed(f"{output_dir}: the app wrote no {name}; see the site's app log")
    for token in path.read_text().replace(",", " ").split():
        try:
            return {"mean": float(token)}
        except ValueError:
            continue  # a label or header before the value
    raise RunFailed(f"{path}: no number in the app's output; see the site's app log")


def centralized(dataset, params: dict[str, Any]) -> dict[str, Any]:
    col = _column_index(dataset, params["column"])
    values = dataset.X[:, col]
    return {"values": values, "pooled_mean": float(values.mean()), "feature": dataset.feature_names[col]}


def compare(
    federated: dict[str, dict],
    centralized: dict,
    split: dict[str, np.ndarray],
    params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    p = {**DEFAULTS, **(params or {})}
    if not federated:
        raise RunFailed("mean comparison: no site returned a result")
    values = centralized["values"]
    local_means = {s: float(values[rows].mean()) for s, rows in split.items()}
    mean_of_local_means = float(np.mean(list(local_means.values())))
    per_site = {s: float(r["mean"]) for s, r in sorted(federated.items())}
    errors = {s: abs(v - mean_of_local_means) for s, v in per_site.items()}
    federated_value = next(iter(per_site.values()))
    return {
        "workflow": "mean",
        "federated": federated_value,
        "mean_of_local_means": mean_of_local_means,
        "pooled_mean": centralized["pooled_mean"],
        "abs_error": max(errors.values()),
        "pooled_minus_mean_of_means": centralized["pooled_mean"] - mean_of_local_means,
        "tolerance": p["tolerance"],
        "sites": {
            s: {"federated": per_site[s], "local_mean": local_means.get(s), "samples": int(len(split.get(s, [])))}
            for s in per_site
        },
        "passed": bool(max(errors.values()) <= p["tolerance"]),
    }
