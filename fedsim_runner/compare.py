"""Comparing a federated result with the centralized one: the shared metrics, and the step that writes them.

Singular vectors are defined up to sign, so every vector metric here is sign-invariant. Angles use the
2·atan2(|a−b|, |a+b|) form, which stays accurate for tiny angles (arccos of a dot product cannot resolve angles below
about 1e-8 rad, too close to the 1e-6 rad pass threshold).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg

from fedsim_runner.workflows.base import jsonable


def _unit(A: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(A, axis=0)
    return A / np.where(norms > 0, norms, 1.0)


def canonical_signs(A: np.ndarray) -> np.ndarray:
    """Per column +1/−1 so that the entry with the largest magnitude is positive (a deterministic sign choice)."""
    idx = np.abs(A).argmax(axis=0)
    signs = np.sign(A[idx, np.arange(A.shape[1])])
    return np.where(signs == 0, 1.0, signs)


def matching_signs(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Per column the sign that turns A's column towards B's."""
    dots = np.einsum("ij,ij->j", A, B)
    return np.where(dots < 0, -1.0, 1.0)


def component_angles(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Angle (rad, in [0, π/2]) between column i of A and column i of B, ignoring sign."""
    A, B = _unit(A), _unit(B) * matching_signs(A, B)
    return 2.0 * np.arctan2(np.linalg.norm(A - B, axis=0), np.linalg.norm(A + B, axis=0))


def subspace_angle(A: np.ndarray, B: np.ndarray) -> float:
    """The largest principal angle (rad) between the column spaces of A and B."""
    return float(scipy.linalg.subspace_angles(A, B).max())


def relative_error(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a − b| / |b| element-wise (absolute error where b is 0)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    n = min(len(a), len(b))
    a, b = a[:n], b[:n]
    return np.abs(a - b) / np.where(b != 0, np.abs(b), 1.0)


def column_correlations(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Pearson correlation of column i of A with column i of B (nan where a column is constant)."""
    A = A - A.mean(axis=0)
    B = B - B.mean(axis=0)
    denom = np.linalg.norm(A, axis=0) * np.linalg.norm(B, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, np.einsum("ij,ij->j", A, B) / denom, np.nan)


def evaluate(
    workflow_name: str,
    cfg,
    dataset,
    split: dict[str, np.ndarray],
    federated: dict[str, dict],
    run_dir: Path,
    reference: dict | None = None,
) -> dict[str, Any]:
    """Step 5 of a run: centralized reference, comparison, and their files in the run directory.

    Writes `centralized/result.json` and `comparison.json`; returns the comparison (JSON-able).
    """
    from fedsim_runner import workflows

    wf = workflows.load(workflow_name)
    p = wf.params(cfg)
    central = wf.centralized(dataset, p)
    kwargs = {"reference": reference} if reference is not None else {}
    comparison = jsonable(wf.compare(federated, central, split, params=p, **kwargs))
    comparison["dataset"] = {
        "name": dataset.name,
        "samples": dataset.n_samples,
        "features": dataset.n_features,
        "dropped_constant_features": len(dataset.dropped_features),
        "split": cfg.data.split,
        "site_samples": {s: int(len(rows)) for s, rows in split.items()},
    }
    run_dir = Path(run_dir)
    (run_dir / "centralized").mkdir(parents=True, exist_ok=True)
    (run_dir / "centralized" / "result.json").write_text(json.dumps(jsonable(central)) + "\n")
    (run_dir / "comparison.json").write_text(json.dumps(comparison, indent=1) + "\n")
    return comparison
