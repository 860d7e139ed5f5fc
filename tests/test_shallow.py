"""Shallow learners on frozen features: separable features reach 100%, labels joined by
key from the ingest index, the folded linear head predicts as the learner does, C chosen
on the validation split, per-class subsets, reruns skip."""

from __future__ import annotations

import numpy as np
import pytest

from cvpipe.core import tables
from cvpipe.core.stage import PermanentError, run_stage
from cvpipe.data import features
from cvpipe.data.shards import unit_url
from cvpipe.learn import shallow
from cvpipe.learn.config import ShallowConfig


def write_split(root, partition, x, labels, hide=()):
    """A features file (as the inference stage writes it) and the ingest index of its
    shard, under ``root``; keys in ``hide`` get no label in the index."""
    keys = [f"{partition}-{i:05d}" for i in range(len(x))]
    sid = f"{partition}/digits-000000"
    f_url = unit_url(str(root / "features"), "features", sid)
    features.write_features(
        f_url, keys, sid, np.asarray(x, np.float32), tables.lineage(None, model_id="ref")
    )
    index = tables.from_rows(
        [
            {
                "key": k,
                "shard": sid,
                "width": 8,
                "height": 8,
                "caption": None,
                "label": None if k in hide else str(lab),
            }
            for k, lab in zip(keys, labels, strict=True)
        ],
        tables.SHARD_INDEX,
    )
    tables.write_parquet(index, unit_url(str(root), "index", sid), tables.lineage(None))
    return f_url, keys


def separable(n_per_class, classes=3, dim=6, seed=0):
    """Gaussian clusters far apart: linearly separable with a wide margin."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, dim)) * 20
    x = np.concatenate([c + rng.normal(size=(n_per_class, dim)) for c in centers])
    y = np.repeat(np.arange(classes), n_per_class)
    return x, y


@pytest.mark.parametrize("model", ["svm", "logistic"])
def test_separable_features_reach_100_percent(tmp_path, model):
    x, y = separable(40)
    xt, yt = separable(30, seed=0)  # same centers, fresh noise
    xt = xt + np.random.default_rng(9).normal(size=xt.shape) * 0.1
    train_url, _ = write_split(tmp_path, "train", x, y)
    test_url, _ = write_split(tmp_path, "test", xt, yt)
    cfg = ShallowConfig(
        features=train_url,
        truth=str(tmp_path),
        test=test_url,
        out=str(tmp_path / "out"),
        model=model,
    )
    row = shallow.run(cfg)
    assert row["top1"] == 1.0
    assert row["train"] == 120 and row["test"] == 90 and row["classes"] == 3
    got = tables.read_parquet(shallow.result_url(str(tmp_path / "out"))).to_pylist()[0]
    assert got["model"] == model and got["top1"] == 1.0


def test_overlapping_features_score_below_100_and_the_head_predicts_like_sklearn(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 5))
    y = (x[:, 0] + 0.8 * rng.normal(size=300) > 0).astype(int)  # noisy labels
    data = shallow.Labeled(x.astype(np.float32), y.astype(str), [str(i) for i in range(300)])
    for kind in ("svm", "logistic"):
        m = shallow.fit(data, kind)
        acc = shallow.accuracy(m, data)
        assert 0.6 < acc < 1.0
        # The folded head on raw features agrees with sklearn on standardized ones.
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler
        from sklearn.svm import LinearSVC

        z = StandardScaler().fit(data.x)
        est = (
            LinearSVC(random_state=0, max_iter=5000)
            if kind == "svm"
            else LogisticRegression(random_state=0, max_iter=5000)
        )
        est.fit(z.transform(data.x), data.y)
        assert (m.predict(data.x) == est.predict(z.transform(data.x))).mean() > 0.99


def test_labels_come_from_the_index_by_key(tmp_path):
    x, y = separable(10, classes=2)
    url, keys = write_split(tmp_path, "train", x, y, hide={"train-00000", "train-00011"})
    data = shallow.load_labeled(url, str(tmp_path))
    assert len(data) == 18 and data.unlabeled == 2
    by_key = dict(zip(data.keys, data.y, strict=True))
    assert by_key["train-00001"] == "0" and by_key["train-00012"] == "1"
    np.testing.assert_allclose(data.x[data.keys.index("train-00012")], x[12], rtol=1e-6)
    with pytest.raises(FileNotFoundError, match="--truth"):
        shallow.load_labeled(url, str(tmp_path / "elsewhere"))


def test_per_class_subset_is_seeded_and_order_free(tmp_path):
    x, y = separable(30, classes=3)
    data = shallow.Labeled(x, y.astype(str), [f"k{i}" for i in range(90)])
    a = shallow.per_class_subset(data, 5, seed=0)
    assert len(a) == 15 and sorted(np.unique(a.y, return_counts=True)[1]) == [5, 5, 5]
    perm = np.random.default_rng(0).permutation(90)
    shuffled = shallow.Labeled(data.x[perm], data.y[perm], [data.keys[i] for i in perm])
    assert set(shallow.per_class_subset(shuffled, 5, seed=0).keys) == set(a.keys)
    assert set(shallow.per_class_subset(data, 5, seed=1).keys) != set(a.keys)
    assert shallow.per_class_subset(data, None) is data


def test_c_is_chosen_on_validation_and_reruns_skip(tmp_path):
    x, y = separable(20, classes=2)
    train_url, _ = write_split(tmp_path, "train", x, y)
    val_url, _ = write_split(tmp_path, "val", *separable(10, classes=2, seed=0))
    test_url, _ = write_split(tmp_path, "test", *separable(10, classes=2, seed=0))
    out = str(tmp_path / "out")
    cfg = ShallowConfig(
        features=train_url,
        truth=str(tmp_path),
        test=test_url,
        out=out,
        model="logistic",
        val=val_url,
        c_grid=[0.1, 1.0],
    )
    [row] = run_stage(shallow.ShallowStage(cfg))
    lin = tables.read_lineage(shallow.result_url(out))
    assert set(lin["val_scores"]) == {"0.1", "1.0"}
    assert row["c"] in (0.1, 1.0)
    # The saved head is numbers and strings only and predicts the test labels.
    w, b, classes = shallow.load_head(shallow.head_url(out))
    assert w.shape == (2, 6) and classes == ["0", "1"]
    mtime = (tmp_path / "out" / "shallow.parquet").stat().st_mtime_ns
    [again] = run_stage(shallow.ShallowStage(cfg))
    assert again == row and (tmp_path / "out" / "shallow.parquet").stat().st_mtime_ns == mtime
    # Another config over the same output is refused, not silently read back.
    with pytest.raises(PermanentError, match="another config"):
        run_stage(shallow.ShallowStage(cfg.model_copy(update={"model": "svm"})))


def test_bad_inputs(tmp_path):
    data = shallow.Labeled(np.zeros((4, 2), np.float32), np.array(["a"] * 4), list("wxyz"))
    with pytest.raises(ValueError, match="two or more classes"):
        shallow.fit(data)
    with pytest.raises(ValueError, match="unknown shallow model"):
        shallow.fit(data, "tree")
