"""Datasets and splits: real sklearn data, real files, real numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedsim_runner import data
from fedsim_runner.config import parse_config
from fedsim_runner.errors import ConfigError


def make_cfg(tmp_path: Path, n_sites: int = 3, workflow: str = "svd", data_toml: str = "", sites_extra=None,
             seed: int = 42):
    sites = []
    for i in range(n_sites):
        extra = (sites_extra or {}).get(i, "")
        sites.append(
            f'[[sites]]\nname = "site{i}"\nfc_user = "u{i}@example.org"\n'
            + ("coordinator = true\n" if i == 0 else "")
            + extra
        )
    text = f'[project]\nname = "t"\nworkflow = "{workflow}"\nseed = {seed}\n[data]\n{data_toml}\n' + "\n".join(sites)
    path = tmp_path / "project.toml"
    path.write_text(text)
    return parse_config(text, path)


def names(n):
    return [f"site{i}" for i in range(n)]


def assert_partition(split, n):
    rows = np.concatenate(list(split.values()))
    assert len(rows) == n
    assert np.array_equal(np.sort(rows), np.arange(n))


@pytest.mark.parametrize("name,shape", [("digits", (1797, 61)), ("breast_cancer", (569, 30)), ("wine", (178, 13)),
                                        ("iris", (150, 4)), ("diabetes", (442, 10))])
def test_sklearn_datasets_load_without_download(tmp_path, name, shape):
    ds = data.load_dataset(make_cfg(tmp_path, data_toml=f'source = "sklearn:{name}"'))
    assert ds.X.shape == shape  # digits: 3 pixels are 0 in every image and are dropped
    assert len(ds.sample_ids) == shape[0] == len(set(ds.sample_ids))
    assert len(ds.feature_names) == shape[1]
    assert ds.labels is not None and len(ds.labels) == shape[0]
    assert (np.ptp(ds.X, axis=0) > 0).all()


def test_unknown_sklearn_dataset_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="sklearn:mnist.*use one of"):
        data.load_dataset(make_cfg(tmp_path, data_toml='source = "sklearn:mnist"'))


def test_synthetic_is_low_rank_and_seeded(tmp_path):
    cfg = make_cfg(tmp_path, data_toml='source = "synthetic"\nsamples = 200\nfeatures = 30\nrank = 4')
    a, b = data.load_dataset(cfg), data.load_dataset(cfg)
    assert np.array_equal(a.X, b.X)
    s = np.linalg.svd(a.X - a.X.mean(axis=0), compute_uv=False)
    assert s[3] > 20 * s[4]  # 4 strong directions, then noise
    other = data.load_dataset(make_cfg(tmp_path, data_toml='source = "synthetic"', seed=7))
    assert not np.array_equal(other.X[:5, :5], a.X[:5, :5])


@pytest.mark.parametrize("kind", ["iid", "label-skew", "size-skew"])
@pytest.mark.parametrize("n_sites", [1, 3, 16])
def test_splits_are_deterministic_partitions_with_a_minimum(tmp_path, kind, n_sites):
    cfg = make_cfg(tmp_path, n_sites, data_toml=f'source = "sklearn:wine"\nsplit = "{kind}"\nalpha = 0.1')
    ds = data.load_dataset(cfg)
    first = data.split(ds, cfg, names(n_sites))
    again = data.split(ds, cfg, names(n_sites))
    assert_partition(first, ds.n_samples)
    assert all(np.array_equal(first[s], again[s]) for s in first)
    assert min(len(r) for r in first.values()) >= data.MIN_SITE_SAMPLES


def test_another_seed_gives_another_split(tmp_path):
    toml = 'source = "sklearn:iris"'
    ds = data.load_dataset(make_cfg(tmp_path, data_toml=toml))
    a = data.split(ds, make_cfg(tmp_path, data_toml=toml, seed=1), names(3))
    b = data.split(ds, make_cfg(tmp_path, data_toml=toml, seed=2), names(3))
    assert not np.array_equal(a["site0"], b["site0"])


def test_label_skew_skews_and_iid_does_not(tmp_path):
    ds = data.load_dataset(make_cfg(tmp_path, data_toml='source = "sklearn:digits"'))
    iid = data.split(ds, make_cfg(tmp_path, 4, data_toml='source = "sklearn:digits"'), names(4))
    skew = data.split(ds, make_cfg(tmp_path, 4, data_toml='source = "sklearn:digits"\nsplit = "label-skew"\nalpha = 0.1'),
                      names(4))
    mild = data.split(ds, make_cfg(tmp_path, 4, data_toml='source = "sklearn:digits"\nsplit = "label-skew"\nalpha = 100'),
                      names(4))
    assert data.skew_of(iid, ds.labels) < 0.06
    assert data.skew_of(skew, ds.labels) > 0.35
    assert data.skew_of(mild, ds.labels) < 0.06  # large alpha: every site close to the pooled class mix


def test_label_skew_on_a_regression_target_uses_quantile_bins(tmp_path):
    cfg = make_cfg(tmp_path, 3, data_toml='source = "sklearn:diabetes"\nsplit = "label-skew"\nalpha = 0.1')
    ds = data.load_dataset(cfg)
    assert_partition(data.split(ds, cfg, names(3)), ds.n_samples)


def test_label_skew_without_labels_is_a_config_error(tmp_path):
    csv = tmp_path / "x.csv"
    csv.write_text("a,b\n1,2\n3,4\n5,7\n")
    cfg = make_cfg(tmp_path, 1, data_toml=f'source = "{csv}"\nsplit = "label-skew"')
    with pytest.raises(ConfigError, match="needs labels"):
        data.split(data.load_dataset(cfg), cfg, names(1))


def test_size_skew_default_is_geometric_and_sizes_are_honoured(tmp_path):
    cfg = make_cfg(tmp_path, 3, data_toml='source = "sklearn:digits"\nsplit = "size-skew"')
    ds = data.load_dataset(cfg)
    sizes = [len(r) for r in data.split(ds, cfg, names(3)).values()]
    assert sizes[0] > sizes[1] > sizes[2]
    assert sizes[0] / sizes[2] == pytest.approx(data.SIZE_SKEW_RATIO, rel=0.02)
    cfg = make_cfg(tmp_path, 3, data_toml='source = "sklearn:digits"\nsplit = "size-skew"\nsizes = [1, 1, 2]')
    sizes = [len(r) for r in data.split(ds, cfg, names(3)).values()]
    assert sizes == [449, 449, 899]
    bad = make_cfg(tmp_path, 3, data_toml='source = "sklearn:digits"\nsplit = "size-skew"\nsizes = [1, 2]')
    with pytest.raises(ConfigError, match="data.sizes: needs 3"):
        data.split(ds, bad, names(3))


def test_too_many_sites_for_the_data_is_a_config_error(tmp_path):
    csv = tmp_path / "x.csv"
    csv.write_text("a,b\n1,2\n3,4\n5,7\n")
    cfg = make_cfg(tmp_path, 2, data_toml=f'source = "{csv}"')
    with pytest.raises(ConfigError, match="too few for 2 sites"):
        data.split(data.load_dataset(cfg), cfg, names(2))


def test_csv_and_tsv_with_ids_and_labels(tmp_path):
    tsv = tmp_path / "d.tsv"
    tsv.write_text("id\tg1\tg2\tclass\np1\t1.5\t2\tA\np2\t3\t4.25\tB\np3\t0\t1\tA\n")
    cfg = make_cfg(tmp_path, 1, data_toml=f'source = "{tsv}"\nlabel_column = "class"')
    ds = data.load_dataset(cfg)
    assert ds.sample_ids == ["p1", "p2", "p3"]
    assert ds.feature_names == ["g1", "g2"]
    assert ds.X.tolist() == [[1.5, 2.0], [3.0, 4.25], [0.0, 1.0]]
    assert ds.labels.tolist() == ["A", "B", "A"]
    plain = tmp_path / "plain.csv"
    plain.write_text("x,y\n1,2\n3,5\n")
    ds = data.load_dataset(make_cfg(tmp_path, 1, data_toml=f'source = "{plain}"'))
    assert ds.sample_ids == ["plain_0", "plain_1"] and ds.X.shape == (2, 2)


@pytest.mark.parametrize(
    "content,message",
    [
        ("a,b\n1,2\n3,x\n", r"bad.csv:3: column 'b': 'x' is not a number"),
        ("a,b\n1,2\n3\n", r"bad.csv:3: 1 fields but the header has 2"),
        ("a,b\n1,2\n3,NA\n", r"bad.csv:3: missing value in column 'b'"),
        ("a,b\n", r"bad.csv: needs a header row and at least one sample row"),
        ("id,a\ns1,1\ns1,2\n", r"bad.csv: sample id 's1' appears twice"),
    ],
)
def test_malformed_files_name_the_file_and_line(tmp_path, content, message):
    bad = tmp_path / "bad.csv"
    bad.write_text(content)
    with pytest.raises(ConfigError, match=message):
        data.load_dataset(make_cfg(tmp_path, 1, data_toml=f'source = "{bad}"'))


def test_split_files_uses_each_sites_own_files(tmp_path):
    (tmp_path / "a.csv").write_text("id,g1,g2\na1,1,2\na2,2,3\na3,0,9\n")
    (tmp_path / "b.csv").write_text("id,g1,g2\nb1,5,1\nb2,7,7\n")
    cfg = make_cfg(tmp_path, 2, data_toml='split = "files"',
                   sites_extra={0: 'data = ["a.csv"]\n', 1: 'data = ["b.csv"]\n'})
    ds = data.load_dataset(cfg)
    sp = data.split(ds, cfg, names(2))
    assert [ds.sample_ids[i] for i in sp["site0"]] == ["a1", "a2", "a3"]
    assert [ds.sample_ids[i] for i in sp["site1"]] == ["b1", "b2"]
    assert ds.X[sp["site1"]].tolist() == [[5.0, 1.0], [7.0, 7.0]]


def test_split_files_with_different_columns_is_a_config_error(tmp_path):
    (tmp_path / "a.csv").write_text("g1,g2\n1,2\n2,3\n")
    (tmp_path / "b.csv").write_text("g1,g3\n5,1\n7,7\n")
    cfg = make_cfg(tmp_path, 2, data_toml='split = "files"',
                   sites_extra={0: 'data = ["a.csv"]\n', 1: 'data = ["b.csv"]\n'})
    with pytest.raises(ConfigError, match=r"b.csv:1: columns differ"):
        data.load_dataset(cfg)


def test_mean_site_files_are_lines_of_numbers(tmp_path):
    for i, line in enumerate(["1,2,3,4,5", "7,9,11", "2,2,2,4,6,6,6"]):
        (tmp_path / f"c{i}.csv").write_text(line + "\n")
    cfg = make_cfg(tmp_path, 3, workflow="mean", data_toml='split = "files"',
                   sites_extra={i: f'data = ["c{i}.csv"]\n' for i in range(3)})
    ds = data.load_dataset(cfg)
    sp = data.split(ds, cfg, names(3))
    assert ds.X[sp["site1"], 0].tolist() == [7.0, 9.0, 11.0]
    (tmp_path / "c2.csv").write_text("2,2,two\n")
    with pytest.raises(ConfigError, match=r"c2.csv:1: 'two' is not a number"):
        data.load_dataset(cfg)
