"""Teacher -> selection -> materialized shards, on real digit shards."""

from __future__ import annotations

import os
import re
from collections import Counter

import pytest
import torch

from cvpipe import models
from cvpipe.core import tables
from cvpipe.core.stage import PermanentError
from cvpipe.data.loader import ShardDataset
from cvpipe.data.shards import iter_shard, read_shard_samples, shard_id
from cvpipe.infer.teacher import Teacher, predictions_url
from cvpipe.label import materialize, selection
from cvpipe.label.config import MaterializeConfig

CLASSES = [f"digit_{i}" for i in range(10)]


@pytest.fixture(scope="module")
def pipeline(digits_shards, tmp_path_factory: pytest.TempPathFactory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("mat")
    torch.manual_seed(1)
    model = models.build("small_cnn", 10)
    ckpt = str(root / "teacher.pt")
    models.save_checkpoint(model, models.ModelInfo("small_cnn", CLASSES, 16), ckpt)
    shards = digits_shards["unlabeled"][:2]
    Teacher(ckpt, device="cpu", batch_size=50, top_p=3, num_workers=0).process(
        shards, str(root / "infer")
    )
    preds = [predictions_url(str(root / "infer"), shard_id(u)) for u in shards]
    selection.select(preds, top_p=3, top_k=25, out=str(root / "sel"))
    return {"root": root, "ckpt": ckpt, "shards": shards, "sel": selection.selection_url(
        str(root / "sel"))}  # fmt: skip


def test_replicates_per_class_with_provenance(pipeline, digits_shards):
    out = str(pipeline["root"] / "student")
    stats = materialize.materialize(
        MaterializeConfig(selection=pipeline["sel"], shards=pipeline["shards"], out=out)
    )
    sel = tables.read_parquet(pipeline["sel"]).to_pylist()
    assert sum(s.written for s in stats) == len(sel) > 25
    assert all(s.missing == 0 and not s.skipped for s in stats)
    by_key = Counter(r["key"] for r in sel)
    multi = [k for k, n in by_key.items() if n > 1]
    assert multi, "the test needs an image selected for two classes"
    teacher = models.model_id(pipeline["ckpt"])
    for url in pipeline["shards"]:
        sid = shard_id(url)
        out_url = materialize.output_url(out, sid)
        assert out_url.endswith(os.path.join("shards", "unlabeled", sid.split("/")[1] + ".tar"))
        source = {s.key: s for s in read_shard_samples(url, decode=False)[0]}
        written, rejects = read_shard_samples(out_url, decode=False)
        assert not rejects
        expect = {(r["key"], r["label"]): r for r in sel if r["shard"] == sid}
        assert len(written) == len(expect)
        for s in written:
            assert re.fullmatch(r"[A-Za-z0-9_-]+", s.key)
            src_key, cls = s.meta["source_key"], s.meta["pseudo"]["class"]
            assert s.key == f"{src_key}_c{cls}"
            row = expect[(src_key, cls)]
            assert s.data == source[src_key].data  # bytes copied, not re-encoded
            assert s.ext == source[src_key].ext
            assert s.meta["label"] == CLASSES[cls]
            assert s.meta["source"] == source[src_key].meta["source"]
            p = s.meta["pseudo"]
            assert (p["teacher"], p["top_p"], p["top_k"]) == (teacher, 3, 25)
            assert p["rank"] == row["rank"] and p["score"] == pytest.approx(row["score"])
    # a multi-class image is there once per class
    k = multi[0]
    sid = next(r["shard"] for r in sel if r["key"] == k)
    keys = [s.key for s in read_shard_samples(materialize.output_url(out, sid))[0]]
    assert sum(x.startswith(k + "_c") for x in keys) == by_key[k]
    # the student's loader reads the pseudo-label by class name
    urls = [materialize.output_url(out, shard_id(u)) for u in pipeline["shards"]]
    ds = ShardDataset(urls, models.preprocess(models.load_info(pipeline["ckpt"])), classes=CLASSES)
    items = list(ds)
    assert len(items) == len(sel)
    assert Counter(it["label"] for it in items) == Counter(r["label"] for r in sel)


def test_rerun_writes_nothing_and_empty_shards_commit(pipeline, digits_shards):
    out = str(pipeline["root"] / "again")
    other = digits_shards["test"][0]  # nothing of it was selected
    config = MaterializeConfig(selection=pipeline["sel"], shards=[*pipeline["shards"], other],
                               out=out)  # fmt: skip
    first = materialize.materialize(config)
    assert first[2].written == 0 and first[2].selected == 0
    assert list(iter_shard(materialize.output_url(out, shard_id(other)))) == []
    files = {
        os.path.join(d, n): os.stat(os.path.join(d, n)).st_mtime_ns
        for d, _, ns in os.walk(out)
        for n in ns
    }
    assert len(files) == 3
    again = materialize.materialize(config)
    assert all(s.skipped for s in again)
    assert [s.written for s in again] == [s.written for s in first]
    after = {
        os.path.join(d, n): os.stat(os.path.join(d, n)).st_mtime_ns
        for d, _, ns in os.walk(out)
        for n in ns
    }
    assert after == files


def test_class_names_from_checkpoint_and_teacher_checked(pipeline, tmp_path):
    prov = materialize.provenance(pipeline["sel"], checkpoint=pipeline["ckpt"])
    assert prov.classes == tuple(CLASSES)
    assert materialize.provenance(pipeline["sel"]).classes == tuple(CLASSES)
    other = str(tmp_path / "other.pt")
    models.save_checkpoint(
        models.build("small_cnn", 10), models.ModelInfo("small_cnn", CLASSES, 16), other
    )
    with pytest.raises(ValueError, match="teacher"):
        materialize.provenance(pipeline["sel"], checkpoint=other)
    # The stage checks the teacher before it writes anything, and the error is
    # permanent (a retry would meet the same teacher).
    out = tmp_path / "wrong-teacher"
    config = MaterializeConfig(selection=pipeline["sel"], shards=pipeline["shards"],
                               out=str(out), checkpoint=other)  # fmt: skip
    with pytest.raises(materialize.ProvenanceError, match="teacher"):
        materialize.materialize(config)
    assert isinstance(materialize.ProvenanceError("x"), PermanentError)
    assert not out.exists()
    # with the right teacher every sample names it
    right = dict(config.model_dump(), out=str(tmp_path / "right"), checkpoint=pipeline["ckpt"])
    materialize.materialize(MaterializeConfig(**right))
    url = materialize.output_url(right["out"], shard_id(pipeline["shards"][0]))
    teachers = {s.meta["pseudo"]["teacher"] for s in iter_shard(url, decode=False)}
    assert teachers == {models.model_id(pipeline["ckpt"])}


def test_a_siamese_run_reads_the_selection_as_labels_of_d_hat(pipeline, tmp_path):
    """D^ renames each copy ``{key}_c{class}``: labels from the selection (keyed by the
    source images) reach the copies through their ``source_key``; an image selected for
    two classes has no single label and is left out."""
    from cvpipe.data.loader import UNKNOWN_LABEL
    from cvpipe.learn import loop
    from cvpipe.learn.config import TrainConfig
    from cvpipe.learn.tasks import ContrastiveTask

    out = str(tmp_path / "dhat")
    materialize.materialize(
        MaterializeConfig(selection=pipeline["sel"], shards=pipeline["shards"], out=out)
    )
    urls = [materialize.output_url(out, shard_id(u)) for u in pipeline["shards"]]
    sel = tables.read_parquet(pipeline["sel"]).to_pylist()
    by_key = Counter(r["key"] for r in sel)
    single = {r["key"]: str(r["label"]) for r in sel if by_key[r["key"]] == 1}
    task = ContrastiveTask(dim=8, labels=pipeline["sel"])
    cfg = TrainConfig(arch="small_cnn", epochs=1, batch_size=16, lr=0.05, input_size=16,
                      cpu_threads=1, device="cpu")  # fmt: skip
    built = task.build(cfg, urls, None)
    items = list(task.dataset(cfg, urls, built.info, stage="train", train=False))
    labeled = [it["label"] for it in items if it["label"] != UNKNOWN_LABEL]
    assert len(items) == len(sel) and len(labeled) == len(single) > 0
    names = built.info.classes
    assert Counter(names[i] for i in labeled) == Counter(single.values())
    ckpt = loop.train(task, cfg, urls, str(tmp_path / "run"))  # failed: no usable sample
    assert models.load_info(ckpt).task == "contrastive"
