"""Federated SVD (store slug `federated-svd`; config section `fc_pca`, FEATURECLOUD.md §5).

Input: features × samples (header of sample ids, first column feature names); samples are the federated dimension and
never leave their site. Only aggregates travel: per-feature sums and sums of squares (centring/scaling), then either
the local covariance XᵢᵀXᵢ (features ≤ 20·k) or, per subspace iteration, XᵢᵀXᵢV (features × k). The coordinator sums
them, orthonormalises (QR) and finishes with a Rayleigh–Ritz step. Folders: /mnt/input and /mnt/output, or
FEDSIM_INPUT_DIR / FEDSIM_OUTPUT_DIR.
"""

import os
import shutil
import time

import numpy as np
import pandas as pd
import yaml
from FeatureCloud.app.engine.app import AppState, Role, app_state

INPUT_DIR = os.getenv("FEDSIM_INPUT_DIR", "/mnt/input")
OUTPUT_DIR = os.getenv("FEDSIM_OUTPUT_DIR", "/mnt/output")
MAX_ITERATIONS = 500
TOLERANCE = 1e-10  # change of the leading subspace between iterations (sine of the largest principal angle)
OVERSAMPLING = 5


def _config() -> dict:
    with open(os.path.join(INPUT_DIR, "config.yml")) as f:
        return yaml.safe_load(f)["fc_pca"]


@app_state("initial")
class Load(AppState):
    """Read the local data; send per-feature count, sum and sum of squares."""

    def register(self):
        self.register_transition("scale", Role.BOTH)

    def run(self):
        config = _config()
        shutil.copy(os.path.join(INPUT_DIR, "config.yml"), os.path.join(OUTPUT_DIR, "config.yml"))
        inp = config.get("input", {})
        path = os.path.join(INPUT_DIR, inp.get("dir", "") or "", inp.get("data", "data.tsv"))
        frame = pd.read_csv(path, sep=inp.get("delimiter", "\t"), index_col=0)
        X = frame.to_numpy(dtype=float).T  # local samples × features
        if config.get("scaling", {}).get("log_transform"):
            X = np.log2(X + 1)
        self.store("X", X)
        self.store("samples", [str(c) for c in frame.columns])
        self.store("features", [str(i) for i in frame.index])
        self.store("config", config)
        self.store("started", time.monotonic())
        self.send_data_to_coordinator([X.shape[0], X.sum(axis=0), (X ** 2).sum(axis=0)])
        return "scale"


@app_state("scale")
class Scale(AppState):
    """Centre and scale with the global mean and standard deviation (ddof 1)."""

    def register(self):
        self.register_transition("covariance", Role.BOTH)
        self.register_transition("iterate", Role.BOTH)

    def run(self):
        if self.is_coordinator:
            parts = self.gather_data()
            n = sum(p[0] for p in parts)
            total, squares = sum(p[1] for p in parts), sum(p[2] for p in parts)
            mean = total / n
            std = np.sqrt(np.maximum(squares - n * mean ** 2, 0) / (n - 1))
            # explicit memos on every broadcast: without one, the engine's await_data() on a coordinator that is the
            # only client takes the wait for a gather round and never sees the broadcast (featurecloud 0.1.0)
            self.broadcast_data([n, mean, std], memo="scale")
        n, mean, std = self.await_data(memo="scale")
        config = self.load("config")
        scaling = config.get("scaling", {})
        X = self.load("X")
        if scaling.get("center", True):
            X = X - mean
        if scaling.get("variance", True):
            X = X / np.where(std > 0, std, 1.0)
        self.store("X", X)
        self.store("n", n)
        k = int(config.get("algorithm", {}).get("pcs", 10))
        self.store("k", k)
        if X.shape[1] <= 20 * k:
            self.send_data_to_coordinator(X.T @ X)
            return "covariance"
        return "iterate"


def _finish(state, V: np.ndarray, eigenvalues: np.ndarray, iterations: int) -> None:
    """Write the outputs of this site (left vectors and eigenvalues are shared; right vectors and projections local)."""
    config, X, k = state.load("config"), state.load("X"), state.load("k")
    out = config.get("output", {})
    delim = out.get("delimiter", "\t")
    V, eigenvalues = V[:, :k], eigenvalues[:k]
    features, samples = state.load("features"), state.load("samples")
    names = [f"PC{i + 1}" for i in range(k)]
    singular = np.sqrt(np.maximum(eigenvalues * (state.load("n") - 1), 1e-300))
    projections = X @ V

    def table(name, values, index):
        pd.DataFrame(values, index=index, columns=names).to_csv(os.path.join(OUTPUT_DIR, out.get(name) or name),
                                                                sep=delim)

    table("left_eigenvectors", V, features)
    table("right_eigenvectors", projections / singular, samples)
    table("projections", projections, samples)
    with open(os.path.join(OUTPUT_DIR, out.get("eigenvalues") or "eigenvalues.tsv"), "w") as f:
        f.write("\n".join(repr(float(v)) for v in eigenvalues) + "\n")
    with open(os.path.join(OUTPUT_DIR, out.get("explained_variance") or "explained_variance.tsv"), "w") as f:
        total = state.load("total_variance")
        f.write("\n".join(repr(float(v / total)) for v in eigenvalues) + "\n")
    with open(os.path.join(OUTPUT_DIR, "run_log.txt"), "w") as f:
        f.write(f"iterations:\t{iterations}\nruntime:\t{time.monotonic() - state.load('started')}\n")


@app_state("covariance")
class Covariance(AppState):
    """Few features: the summed covariance, decomposed at the coordinator."""

    def register(self):
        self.register_transition("terminal", Role.BOTH)

    def run(self):
        if self.is_coordinator:
            C = sum(self.gather_data()) / (self.load("n") - 1)
            values, vectors = np.linalg.eigh(C)
            order = np.argsort(values)[::-1]
            self.broadcast_data([vectors[:, order], values[order], float(np.trace(C)), 1], memo="eigen")
        V, values, total, iterations = self.await_data(memo="eigen")
        self.store("total_variance", total)
        _finish(self, V, values, iterations)
        return "terminal"


@app_state("iterate")
class Iterate(AppState):
    """Many features: subspace iteration on the implicit covariance; the coordinator sums XᵢᵀXᵢV and does the QR."""

    def register(self):
        self.register_transition("iterate", Role.BOTH)
        self.register_transition("terminal", Role.BOTH)

    def run(self):
        X = self.load("X")
        r = self._app.internal.get("round", 0)  # broadcasts carry their round: memo "round<r>"
        if self.is_coordinator and "V" not in self._app.internal:  # first round: a random orthonormal start
            rng = np.random.default_rng(0)
            V = np.linalg.qr(rng.standard_normal((X.shape[1], self.load("k") + OVERSAMPLING)))[0]
            self.store("V", V)
            self.store("iterations", 0)
            self.broadcast_data(["V", V], memo=f"round{r}")
        kind, payload = self.await_data(memo=f"round{r}")
        self.store("round", r + 1)
        if kind == "done":
            V, values, total, iterations = payload
            self.store("total_variance", total)
            _finish(self, V, values, iterations)
            return "terminal"
        self.send_data_to_coordinator([X.T @ (X @ payload), float((X ** 2).sum())])
        if self.is_coordinator:
            parts = self.gather_data()
            W = sum(p[0] for p in parts)
            total = sum(p[1] for p in parts) / (self.load("n") - 1)
            iterations = self.load("iterations") + 1
            self.store("iterations", iterations)
            V_new = np.linalg.qr(W)[0]
            old, new = payload[:, :self.load("k")], V_new[:, :self.load("k")]
            change = np.linalg.norm(new - old @ (old.T @ new), 2)
            if change < TOLERANCE or iterations >= MAX_ITERATIONS:
                # Rayleigh–Ritz: the best rotation within the converged subspace
                values, rotation = np.linalg.eigh(payload.T @ W / (self.load("n") - 1))
                order = np.argsort(values)[::-1]
                self.broadcast_data(["done", [payload @ rotation[:, order], values[order], total, iterations]],
                                    memo=f"round{r + 1}")
            else:
                self.store("V", V_new)
                self.broadcast_data(["V", V_new], memo=f"round{r + 1}")
        return "iterate"
