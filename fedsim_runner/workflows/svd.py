"""Federated SVD (app `federated-svd`, FEATURECLOUD.md §5): input files, outputs, centralized SVD, comparison.

The app's orientation is features × samples (samples are the federated dimension): its LEFT singular vectors are
the feature loadings every site shares, its RIGHT singular vectors are each site's own samples. The centralized
reference applies the same centring/scaling to the pooled data and takes numpy's SVD.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from fedsim_runner import compare as metrics
from fedsim_runner.errors import ConfigError, RunFailed
from fedsim_runner.workflows.base import check_params, find_output_file, yaml_bytes

APP_SLUG = "federated-svd"
INPUT_FILE = "data.tsv"
DELIMITER = "\t"
OUTPUT_FILES = {
    "eigenvalues": "eigenvalues.tsv",
    "explained_variance": "explained_variance.tsv",
    "left_eigenvectors": "left_eigenvectors.tsv",
    "right_eigenvectors": "right_eigenvectors.tsv",
    "projections": "projections.tsv",
    "scaled_data_file": "scaled_data.tsv",
}
RUN_LOG = "run_log.txt"
SCATTER_POINTS = 2000  # samples per site kept in comparison.json for the projection scatter plot

DEFAULTS: dict[str, Any] = {
    "k": 10,  # number of singular vectors (the app's algorithm.pcs)
    "center": True,
    "variance": True,  # scale every feature to unit variance (standard deviation with ddof = 1)
    "log_transform": False,  # log2(x + 1) before scaling
    "tolerance": 1e-6,  # the run passes when every component's angle to the centralized one is below this (rad)
    "reference_run": False,  # also run the app with one site holding all data (fedflow's reference)
}


def params(cfg) -> dict[str, Any]:
    p = check_params(cfg, DEFAULTS, "svd")
    if p["k"] < 1:
        raise ConfigError(f"{cfg.path}: workflow.k: must be at least 1; set the number of singular vectors to compute")
    if p["tolerance"] <= 0:
        raise ConfigError(f"{cfg.path}: workflow.tolerance: must be positive (radians), e.g. 1e-6")
    return p


def app_config(p: dict[str, Any]) -> dict:
    """config.yml for the app: the `fc_pca` section as the app documents it."""
    return {
        "fc_pca": {
            "input": {"data": INPUT_FILE, "dir": "", "delimiter": DELIMITER},
            "algorithm": {"pcs": p["k"]},
            "scaling": {
                "center": p["center"],
                "variance": p["variance"],
                "log_transform": p["log_transform"],
                "highly_variable": False,  # FedSim compares on all features; selection would change the problem
                "perc_highly_var": 1.0,
                "max_nan_fraction": 1.0,
            },
            "privacy": {"send_projections": False, "subsample_projections": False},
            "output": {"dir": "", **OUTPUT_FILES, "delimiter": DELIMITER},
        }
    }


def site_table(dataset, rows: np.ndarray) -> bytes:
    """One site's data in the app's orientation: a header of sample ids, then one row per feature."""
    out = io.StringIO()
    out.write(DELIMITER.join(["feature", *(dataset.sample_ids[i] for i in rows)]) + "\n")
    block = dataset.X[rows].T
    for name, values in zip(dataset.feature_names, block.tolist(), strict=True):  # repr: exact round trip
        out.write(name + DELIMITER + DELIMITER.join(map(repr, values)) + "\n")
    return out.getvalue().encode()


def prepare(cfg, dataset, split: dict[str, np.ndarray]) -> dict[str, dict[str, bytes]]:
    """{site: {filename: bytes}}. A split with one site holding every row gives the single-site reference run."""
    p = params(cfg)
    limit = min(dataset.n_features, dataset.n_samples)
    if p["k"] > limit:
        raise ConfigError(
            f"{cfg.path}: workflow.k = {p['k']} exceeds min(features, samples) = {limit} of {dataset.name}; lower k"
        )
    config = yaml_bytes(app_config(p))
    return {site: {INPUT_FILE: site_table(dataset, rows), "config.yml": config} for site, rows in split.items()}


def single_site_split(dataset, site: str) -> dict[str, np.ndarray]:
    """The split of the reference run: one site holds every sample."""
    return {site: np.arange(dataset.n_samples)}


# ------------------------------------------------------------------------------------------------ the app's output


def _output_names(output_dir: Path) -> dict[str, str]:
    """Output file names from the config.yml the app copies to its output (our defaults when absent)."""
    names = dict(OUTPUT_FILES)
    found = find_output_file(output_dir, "config.yml")
    if found:
        try:
            section = (yaml.safe_load(found.read_text()) or {}).get("fc_pca", {})
            names.update({k: v for k, v in (section.get("output") or {}).items() if k in names and v})
        except yaml.YAMLError:
            pass  # a damaged copy of our own config: the defaults are what we asked for
    return names


def _table(path: Path) -> tuple[list[str], np.ndarray]:
    """A TSV with a header row and an index column: (row names, values)."""
    frame = pd.read_csv(path, sep=DELIMITER, index_col=0, dtype=str)  # ids like "007" stay as written
    return [str(i) for i in frame.index], frame.to_numpy(dtype=float)


def _column(path: Path) -> np.ndarray:
    """A one-value-per-line file, with or without an index column or header: the last numeric field per line."""
    values = []
    for line in path.read_text().splitlines():
        fields = [f for f in line.replace(",", DELIMITER).split(DELIMITER) if f.strip()]
        try:
            values.append(float(fields[-1]))
        except (ValueError, IndexError):
            continue  # header line
    return np.asarray(values)


def read_result(output_dir: Path) -> dict[str, Any]:
    """The app's output files of one site, parsed; RunFailed naming the folder when the main result is missing."""
    output_dir = Path(output_dir)
    names = _output_names(output_dir)
    paths = {key: find_output_file(output_dir, name) for key, name in names.items()}
    for key in ("left_eigenvectors", "eigenvalues"):
        if paths[key] is None:
            raise RunFailed(f"{output_dir}: the app wrote no {names[key]}; see the site's app log")
    features, left = _table(paths["left_eigenvectors"])
    result: dict[str, Any] = {
        "features": features,
        "left": left,
        "eigenvalues": _column(paths["eigenvalues"]),
    }
    if paths["explained_variance"]:
        result["explained_variance"] = _column(paths["explained_variance"])
    if paths["right_eigenvectors"]:
        result["right_ids"], result["right"] = _table(paths["right_eigenvectors"])
    if paths["projections"]:
        result["projection_ids"], result["projections"] = _table(paths["projections"])
    log = find_output_file(output_dir, RUN_LOG)
    if log:
        for line in log.read_text().splitlines():
            key, _, value = line.partition(":")
            try:
                number = float(value.strip())
            except ValueError:
                continue
            result[key.strip()] = int(number) if key.strip() == "iterations" else number
    return result


# ---------------------------------------------------------------------------------------------------- centralized


def scale(X: np.ndarray, p: dict[str, Any]) -> np.ndarray:
    """The app's preprocessing on the pooled data (samples × features)."""
    X = np.log2(X + 1.0) if p["log_transform"] else np.array(X, dtype=float)
    if p["center"]:
        X = X - X.mean(axis=0)
    if p["variance"]:
        std = X.std(axis=0, ddof=1)
        X = X / np.where(std > 0, std, 1.0)
    return X


def centralized(dataset, params: dict[str, Any]) -> dict[str, Any]:
    """SVD of the pooled, scaled data in the app's orientation (features × samples)."""
    Xs = scale(dataset.X, params)
    k = min(params["k"], *Xs.shape)
    U, s, Vt = np.linalg.svd(Xs.T, full_matrices=False)
    U, s, V = U[:, :k], s[:k], Vt[:k].T
    signs = metrics.canonical_signs(U)
    U, V = U * signs, V * signs
    n = Xs.shape[0]
    eigenvalues = s**2 / (n - 1)  # variance along each component (the covariance matrix's eigenvalues)
    total = float((Xs**2).sum() / (n - 1))
    return {
        "features": list(dataset.feature_names),
        "sample_ids": list(dataset.sample_ids),
        "left": U,
        "right": V,
        "singular_values": s,
        "eigenvalues": eigenvalues,
        "explained_variance": eigenvalues / total if total else eigenvalues * math.nan,
        "projections": Xs @ U,
    }


# ------------------------------------------------------------------------------------------------------ comparison


def _aligned_left(result: dict, features: list[str], site: str) -> np.ndarray:
    index = {f: i for i, f in enumerate(result["features"])}
    missing = [f for f in features if f not in index]
    if missing or len(index) != len(features):
        extra = sorted(set(index) - set(features))
        raise RunFailed(
            f"site {site}: the app's left eigenvectors cover other features than the data "
            f"(missing {missing[:3]}, unexpected {extra[:3]}); check the site's input file"
        )
    return result["left"][[index[f] for f in features]]


def _site_rows(ids: list[str], central_ids: dict[str, int], site: str, what: str) -> list[int]:
    try:
        return [central_ids[i] for i in ids]
    except KeyError as e:
        raise RunFailed(f"site {site}: sample {e.args[0]!r} in the app's {what} is not in the data") from None


def _sample_side(fed: np.ndarray, cen: np.ndarray, signs: np.ndarray) -> dict[str, Any]:
    k = min(fed.shape[1], cen.shape[1])
    fed, cen = fed[:, :k] * signs[:k], cen[:, :k]
    scale_ = np.maximum(np.abs(cen).max(axis=0), np.finfo(float).tiny)
    diff = np.abs(fed - cen).max(axis=0)
    return {
        "max_abs_diff": float(diff.max()),
        "max_rel_diff": float((diff / scale_).max()),
        "max_abs_diff_per_component": diff,
        "correlation_per_component": metrics.column_correlations(fed, cen),
    }


def compare(
    federated: dict[str, dict],
    centralized: dict,
    split: dict[str, np.ndarray],
    params: dict[str, Any] | None = None,
    reference: dict | None = None,
) -> dict[str, Any]:
    """Federated vs centralized: angles of the left singular vectors, eigenvalues, and each site's sample side.

    `reference`: the app's result with one site holding all data (optional), compared the same way.
    """
    p = {**DEFAULTS, **(params or {})}
    if not federated:
        raise RunFailed("svd comparison: no site returned a result")
    features = centralized["features"]
    sites = sorted(federated)
    lefts = {s: _aligned_left(federated[s], features, s) for s in sites}
    fed_left = lefts[sites[0]]
    k = min(fed_left.shape[1], centralized["left"].shape[1])
    cen_left = centralized["left"][:, :k]
    fed_left = fed_left[:, :k]
    angles = metrics.component_angles(fed_left, cen_left)
    signs = metrics.matching_signs(fed_left, cen_left)
    fed_eig = np.asarray(federated[sites[0]]["eigenvalues"])[:k]
    cen_eig = centralized["eigenvalues"][: len(fed_eig)]
    out: dict[str, Any] = {
        "workflow": "svd",
        "k": k,
        "k_requested": p["k"],
        "tolerance": p["tolerance"],
        "max_angle": float(angles.max()),
        "subspace_angle": metrics.subspace_angle(fed_left, cen_left),
        "angles": angles,
        "eigenvalues": {
            "federated": fed_eig,
            "centralized": cen_eig,
            "relative_error": metrics.relative_error(fed_eig, cen_eig),
            "max_relative_error": float(metrics.relative_error(fed_eig, cen_eig).max()) if len(fed_eig) else None,
        },
        # every site must hold the same left vectors: the largest difference between any site and the first
        "left_consistency": max(
            (float(np.abs(lefts[s][:, :k] * metrics.matching_signs(lefts[s][:, :k], fed_left) - fed_left).max())
             for s in sites),
            default=0.0,
        ),
        "sites": {},
        "scatter": {},
    }
    central_ids = {sid: i for i, sid in enumerate(centralized["sample_ids"])}
    for s in sites:
        res = federated[s]
        site_out: dict[str, Any] = {"samples": int(len(split.get(s, []))), "iterations": res.get("iterations")}
        site_out["runtime"] = res.get("runtime")
        if "projections" in res:
            rows = _site_rows(res["projection_ids"], central_ids, s, "projections")
            cen = centralized["projections"][rows]
            site_out["projections"] = _sample_side(res["projections"], cen, signs)
            m = min(2, k, res["projections"].shape[1])
            keep = slice(0, SCATTER_POINTS)
            out["scatter"][s] = {
                "federated": (res["projections"][keep, :m] * signs[:m]),
                "centralized": cen[keep, :m],
            }
        if "right" in res:
            rows = _site_rows(res["right_ids"], central_ids, s, "right eigenvectors")
            site_out["right"] = _sample_side(res["right"], centralized["right"][rows], signs)
        out["sites"][s] = site_out
    if reference is not None:
        ref_left = _aligned_left(reference, features, "reference")[:, :k]
        out["reference"] = {
            "angles_federated_vs_reference": metrics.component_angles(fed_left, ref_left),
            "angles_reference_vs_centralized": metrics.component_angles(ref_left, cen_left),
            "iterations": reference.get("iterations"),
            "runtime": reference.get("runtime"),
        }
    out["passed"] = bool(out["max_angle"] < p["tolerance"] and k == min(p["k"], centralized["left"].shape[1]))
    return out
