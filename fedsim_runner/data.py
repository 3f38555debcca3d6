"""Datasets (samples × features) and how they are split across sites.

Sources (`[data] source` in the project file):
- `sklearn:<name>`: digits, breast_cancer, wine, iris, diabetes (they ship inside scikit-learn, no download);
- `synthetic`: a low-rank signal plus noise, `samples`/`features`/`rank` from `[data]`, drawn with `project.seed`;
- a CSV/TSV file with samples as rows, a header row of feature names, optionally a first column of sample ids and a
  label column (`label_column`).
Splits (`[data] split`): `iid`, `label-skew` (per class, site shares drawn from Dirichlet(alpha)), `size-skew` (relative
`sizes`, default geometric with the largest site 10× the smallest) and `files` (each site's own files, `sites.data`).
Every split is a partition of the samples, deterministic for a seed, and gives every site at least MIN_SITE_SAMPLES.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedsim_runner.errors import ConfigError

SKLEARN_DATASETS = ("digits", "breast_cancer", "wine", "iris", "diabetes")
MIN_SITE_SAMPLES = 2  # a site with fewer samples has no local variance and leaks its only sample in any statistic
SIZE_SKEW_RATIO = 10.0  # default size-skew: largest site / smallest site
REGRESSION_BINS = 5  # a continuous target is cut into this many quantile bins to act as a label for label-skew
MISSING = {"", "na", "nan", "null", "none"}


@dataclass
class Dataset:
    """The pooled data: X[i, j] = sample i, feature j."""

    name: str
    X: np.ndarray
    sample_ids: list[str]
    feature_names: list[str]
    labels: np.ndarray | None = None
    site_rows: dict[str, np.ndarray] | None = None  # split "files": which rows came from which site's files
    dropped_features: list[str] = field(default_factory=list)  # constant over all samples (no variance to scale)

    @property
    def n_samples(self) -> int:
        return self.X.shape[0]

    @property
    def n_features(self) -> int:
        return self.X.shape[1]

    def subset(self, rows: np.ndarray) -> Dataset:
        labels = None if self.labels is None else self.labels[rows]
        return Dataset(self.name, self.X[rows], [self.sample_ids[i] for i in rows], self.feature_names, labels)


def load_dataset(cfg) -> Dataset:
    """The dataset the project file describes, with features that are constant over all samples removed."""
    d = cfg.data
    if d.split == "files":
        ds = _load_site_files(cfg)
    elif d.source.startswith("sklearn:"):
        ds = _load_sklearn(d.source.removeprefix("sklearn:"), cfg)
    elif d.source == "synthetic":
        ds = synthetic(d.samples, d.features, d.rank, cfg.project.seed)
    else:
        ds = read_table(cfg.resolve(Path(d.source)), d.label_column)
    return _drop_constant_features(ds)


def _load_sklearn(name: str, cfg) -> Dataset:
    if name not in SKLEARN_DATASETS:
        raise ConfigError(
            f"{cfg.path}: data.source: unknown dataset sklearn:{name}; use one of "
            + ", ".join(f"sklearn:{n}" for n in SKLEARN_DATASETS)
        )
    import sklearn.datasets

    bunch = getattr(sklearn.datasets, f"load_{name}")()
    X = np.asarray(bunch.data, dtype=float)
    features = [str(f).replace(" ", "_") for f in getattr(bunch, "feature_names", [])] or [
        f"f{j}" for j in range(X.shape[1])
    ]
    width = len(str(X.shape[0]))
    ids = [f"{name}_{i:0{width}d}" for i in range(X.shape[0])]
    return Dataset(f"sklearn:{name}", X, ids, features, np.asarray(bunch.target))


def synthetic(samples: int, features: int, rank: int, seed: int) -> Dataset:
    """Low-rank signal with well separated singular values plus small noise and per-feature offsets.

    Labels are the tercile of each sample's score on the strongest latent factor, so label-skew gives sites that
    differ along the main direction of variance.
    """
    if rank > min(samples, features):
        raise ConfigError(f"data.rank = {rank} exceeds min(samples, features) = {min(samples, features)}; lower it")
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal((samples, rank)) * np.linspace(10.0, 2.0, rank)
    loadings = np.linalg.qr(rng.standard_normal((features, rank)))[0].T
    X = scores @ loadings + 0.05 * rng.standard_normal((samples, features)) + rng.uniform(-5, 5, features)
    labels = np.digitize(scores[:, 0], np.quantile(scores[:, 0], [1 / 3, 2 / 3]))
    width = len(str(samples))
    return Dataset(
        f"synthetic(n={samples},p={features},rank={rank},seed={seed})",
        X,
        [f"sample_{i:0{width}d}" for i in range(samples)],
        [f"feature_{j:0{len(str(features))}d}" for j in range(features)],
        labels,
    )


def _delimiter(path: Path, first_line: str) -> str:
    if path.suffix.lower() in {".tsv", ".tab", ".txt"} or "\t" in first_line:
        return "\t"
    return ";" if first_line.count(";") > first_line.count(",") else ","


def _number(text: str, path: Path, line: int, column: str) -> float:
    if text.strip().lower() in MISSING:
        raise ConfigError(f"{path}:{line}: missing value in column {column!r}; fill it in or remove the sample")
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{path}:{line}: column {column!r}: {text!r} is not a number; fix the value") from None


def read_table(path: Path, label_column: str | None = None, id_prefix: str | None = None) -> Dataset:
    """A CSV/TSV file: header row of feature names, one sample per row, first column sample ids when not numeric.

    Without an id column the samples are named `<id_prefix or file stem>_<row>`.
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: data file does not exist; fix the path") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the data file ({e}); it must be a UTF-8 CSV/TSV file") from None
    lines = text.splitlines()
    if len(lines) < 2:
        raise ConfigError(f"{path}: needs a header row and at least one sample row; add them")
    rows = list(csv.reader(lines, delimiter=_delimiter(path, lines[0])))
    header = [h.strip() for h in rows[0]]
    body = [(i + 2, r) for i, r in enumerate(rows[1:]) if any(c.strip() for c in r)]
    for line, r in body:
        if len(r) != len(header):
            raise ConfigError(
                f"{path}:{line}: {len(r)} fields but the header has {len(header)}; every row needs one value per column"
            )
    first_values = [r[0].strip() for _, r in body]
    has_ids = header[0] == "" or any(not _is_number(v) for v in first_values)
    label_idx = None
    if label_column is not None:
        if label_column not in header:
            raise ConfigError(f"{path}:1: no column {label_column!r} for data.label_column; header has {header[:8]}")
        label_idx = header.index(label_column)
    value_cols = [j for j in range(len(header)) if j != label_idx and not (has_ids and j == 0)]
    if not value_cols:
        raise ConfigError(f"{path}:1: no feature columns; the header must name at least one feature")
    X = np.array([[_number(r[j], path, line, header[j]) for j in value_cols] for line, r in body], dtype=float)
    ids = first_values if has_ids else [f"{id_prefix or path.stem}_{i}" for i in range(len(body))]
    dupes = sorted({s for s in ids if ids.count(s) > 1}) if len(set(ids)) != len(ids) else []
    if dupes:
        raise ConfigError(f"{path}: sample id {dupes[0]!r} appears twice; sample ids must be unique")
    labels = np.array([r[label_idx].strip() for _, r in body]) if label_idx is not None else None
    return Dataset(str(path), X, ids, [header[j] or f"f{j}" for j in value_cols], labels)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return text.strip().lower() in MISSING
    return True


def _load_site_files(cfg) -> Dataset:
    """Split "files": every site brings its own files (same columns); the pooled dataset is their concatenation.

    A workflow whose app reads another format (mean: one line of numbers) parses them with its `read_site_file`.
    """
    from fedsim_runner import workflows

    reader = getattr(workflows.load(cfg.project.workflow), "read_site_file", None)
    parts, site_rows, start = [], {}, 0
    for site in cfg.sites:
        for number, f in enumerate(site.data):
            prefix = f"{site.name}_{number}" if len(site.data) > 1 else site.name
            path = cfg.resolve(f)
            part = reader(path, prefix) if reader else read_table(path, cfg.data.label_column, prefix)
            if parts and part.feature_names != parts[0].feature_names:
                raise ConfigError(
                    f"{path}:1: columns differ from {parts[0].name}; every site's file needs the same header"
                )
            parts.append(part)
            site_rows.setdefault(site.name, []).extend(range(start, start + part.n_samples))
            start += part.n_samples
    ids = [s for p in parts for s in p.sample_ids]
    if len(set(ids)) != len(ids):
        dup = next(s for s in ids if ids.count(s) > 1)
        raise ConfigError(f"sites.*.data: sample id {dup!r} appears in more than one file; make sample ids unique")
    labels = None
    if all(p.labels is not None for p in parts):
        labels = np.concatenate([p.labels for p in parts])
    return Dataset(
        "files:" + ",".join(Path(p.name).name for p in parts),
        np.vstack([p.X for p in parts]),
        ids,
        parts[0].feature_names,
        labels,
        {s: np.asarray(r, dtype=int) for s, r in site_rows.items()},
    )


def _drop_constant_features(ds: Dataset) -> Dataset:
    keep = np.ptp(ds.X, axis=0) > 0 if ds.n_samples else np.ones(ds.n_features, bool)
    if keep.all():
        return ds
    ds.dropped_features = [f for f, k in zip(ds.feature_names, keep, strict=True) if not k]
    ds.X = ds.X[:, keep]
    ds.feature_names = [f for f, k in zip(ds.feature_names, keep, strict=True) if k]
    return ds


# ---------------------------------------------------------------------------------------------------------- splits


def split(dataset: Dataset, cfg, site_names: list[str]) -> dict[str, np.ndarray]:
    """{site: sorted row indices}: a partition of the dataset's samples, deterministic for `project.seed`."""
    d = cfg.data
    n_sites = len(site_names)
    if d.split == "files":
        if dataset.site_rows is None:
            raise ConfigError("data.split = \"files\" needs the dataset loaded from sites.*.data; set data files per site")
        missing = [s for s in site_names if s not in dataset.site_rows]
        if missing:
            raise ConfigError(f"sites.{missing[0]}.data: no data files for this site; add them")
        return {s: dataset.site_rows[s] for s in site_names}
    if dataset.n_samples < n_sites * MIN_SITE_SAMPLES:
        raise ConfigError(
            f"data: {dataset.name} has {dataset.n_samples} samples, too few for {n_sites} sites with at least "
            f"{MIN_SITE_SAMPLES} each; use fewer sites or a larger dataset"
        )
    rng = np.random.default_rng(cfg.project.seed)
    if d.split == "iid":
        parts = np.array_split(rng.permutation(dataset.n_samples), n_sites)
    elif d.split == "size-skew":
        parts = _size_skew(dataset.n_samples, n_sites, d.sizes, rng)
    elif d.split == "label-skew":
        parts = _label_skew(dataset, n_sites, d.alpha, rng)
    else:
        raise ConfigError(f"data.split: unknown split {d.split!r}; use iid, label-skew, size-skew or files")
    return {s: np.sort(np.asarray(p, dtype=int)) for s, p in zip(site_names, parts, strict=True)}


def _counts(total: int, weights: np.ndarray, minimum: int) -> np.ndarray:
    """Integer counts proportional to weights (largest remainder), each at least `minimum`, summing to total."""
    raw = total * weights / weights.sum()
    counts = np.floor(raw).astype(int)
    for i in np.argsort(counts - raw)[: total - counts.sum()]:
        counts[i] += 1
    while (counts < minimum).any():  # take from the largest site until every site has its minimum
        counts[np.argmin(counts)] += 1
        counts[np.argmax(counts)] -= 1
    return counts


def _size_skew(n: int, n_sites: int, sizes: list[float] | None, rng: np.random.Generator) -> list[np.ndarray]:
    if sizes is not None:
        if len(sizes) != n_sites or any(s <= 0 for s in sizes):
            raise ConfigError(
                f"data.sizes: needs {n_sites} positive relative sizes (one per site), got {sizes}; fix the list"
            )
        weights = np.asarray(sizes, dtype=float)
    else:
        weights = SIZE_SKEW_RATIO ** (-np.arange(n_sites) / max(n_sites - 1, 1))
    counts = _counts(n, weights, MIN_SITE_SAMPLES)
    return np.split(rng.permutation(n), np.cumsum(counts)[:-1])


def _label_classes(dataset: Dataset) -> np.ndarray:
    labels = dataset.labels
    if labels is None:
        raise ConfigError(
            f"data.split = \"label-skew\" needs labels, and {dataset.name} has none; set data.label_column or use iid"
        )
    if labels.dtype.kind == "f" and len(np.unique(labels)) > 20:  # regression target: quantile bins as classes
        edges = np.quantile(labels, np.linspace(0, 1, REGRESSION_BINS + 1)[1:-1])
        return np.digitize(labels, edges)
    return np.unique(labels, return_inverse=True)[1]


def _label_skew(dataset: Dataset, n_sites: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Per class, the share each site gets is drawn from Dirichlet(alpha): small alpha → few classes per site."""
    classes = _label_classes(dataset)
    parts: list[list[int]] = [[] for _ in range(n_sites)]
    for c in np.unique(classes):
        members = rng.permutation(np.flatnonzero(classes == c))
        shares = rng.dirichlet(np.full(n_sites, alpha))
        counts = _counts(len(members), shares, 0)
        for site, chunk in enumerate(np.split(members, np.cumsum(counts)[:-1])):
            parts[site].extend(chunk.tolist())
    # every site needs its minimum: move random samples from the largest site (keeps the skew everywhere else)
    for site in range(n_sites):
        while len(parts[site]) < MIN_SITE_SAMPLES:
            donor = max(range(n_sites), key=lambda s: len(parts[s]))
            parts[site].append(parts[donor].pop(int(rng.integers(len(parts[donor])))))
    return [np.asarray(p) for p in parts]


def skew_of(split_rows: dict[str, np.ndarray], labels: np.ndarray) -> float:
    """Total variation distance between the sites' label distributions and the pooled one, averaged over sites."""
    classes, inverse = np.unique(labels, return_inverse=True)
    pooled = np.bincount(inverse, minlength=len(classes)) / len(labels)
    tv = []
    for rows in split_rows.values():
        local = np.bincount(inverse[rows], minlength=len(classes)) / max(len(rows), 1)
        tv.append(0.5 * np.abs(local - pooled).sum())
    return float(np.mean(tv)) if tv else math.nan
