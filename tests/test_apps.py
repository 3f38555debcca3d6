"""apps/federated_svd on real engine processes (runtime + in-process relay, no hub): both algorithm paths, k = 5,
left singular vectors against numpy's SVD of the pooled, scaled data; only aggregates travel."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from scipy.linalg import subspace_angles

from fedsim_runner.data import synthetic
from fedsim_runner.workflows import svd
from tests.conftest import REPO
from tests.test_runtime import inputs_for, run_instances

pytestmark = pytest.mark.e2e
K = 5


@pytest.mark.parametrize(("features", "path"), [(12, "covariance"), (150, "subspace iteration")])
def test_federated_svd_matches_pooled_svd(tmp_path, features, path):
    assert (features <= 20 * K) == (path == "covariance")
    data = synthetic(samples=90, features=features, rank=8, seed=features)
    p = {**svd.DEFAULTS, "k": K}
    config = yaml.safe_dump(svd.app_config(p))
    splits = np.array_split(np.arange(data.n_samples), 3)
    inputs = inputs_for(tmp_path, [{svd.INPUT_FILE: svd.site_table(data, rows).decode(), "config.yml": config}
                                   for rows in splits])
    outputs, outcome, _ = run_instances(REPO / "apps" / "federated_svd", inputs, tmp_path)
    assert outcome == ["finished"] * 3

    U = np.linalg.svd(svd.scale(data.X, p).T, full_matrices=False)[0][:, :K]  # features × k
    for out, rows in zip(outputs, splits, strict=True):
        result = svd.read_result(out)
        assert result["features"] == data.feature_names
        assert max(subspace_angles(result["left"], U)) < 1e-6
        assert result["right_ids"] == [data.sample_ids[i] for i in rows]  # each site's samples stay its own
        assert result["runtime"] >= 0
        assert result["iterations"] > 1 or path == "covariance", result["iterations"]


@pytest.mark.parametrize(("features", "path"), [(12, "covariance"), (150, "subspace iteration")])
def test_federated_svd_with_a_single_client_is_the_exact_svd(tmp_path, features, path):
    """fedflow's reference run: one site holds every sample (explicit memos on every broadcast, see the app)."""
    data = synthetic(samples=60, features=features, rank=8, seed=features + 1)
    p = {**svd.DEFAULTS, "k": K}
    config = yaml.safe_dump(svd.app_config(p))
    inputs = inputs_for(tmp_path, [{svd.INPUT_FILE: svd.site_table(data, np.arange(data.n_samples)).decode(),
                                    "config.yml": config}])
    outputs, outcome, _ = run_instances(REPO / "apps" / "federated_svd", inputs, tmp_path)
    assert outcome == ["finished"], path
    U = np.linalg.svd(svd.scale(data.X, p).T, full_matrices=False)[0][:, :K]
    assert max(subspace_angles(svd.read_result(outputs[0])["left"], U)) < 1e-6
