"""The Siamese study flow on the bundled digits, the embedding net through the inference
stage, and the index commands of the CLI."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from cvpipe import models
from cvpipe.core import storage, tables
from cvpipe.index import source
from cvpipe.infer.config import InferConfig
from cvpipe.infer.stage import infer
from cvpipe.learn import loop
from cvpipe.learn.config import TrainConfig
from cvpipe.learn.tasks import ContrastiveTask


def _small(**kw):
    base = dict(arch="small_cnn", input_size=16, epochs=2, batch_size=32, lr=0.05,
                cpu_threads=1, device="cpu")  # fmt: skip
    return TrainConfig(**{**base, **kw})


def test_the_inference_stage_embeds_with_an_embedding_net(digits_shards, tmp_path):
    ckpt = loop.train(ContrastiveTask(dim=8), _small(), digits_shards["labeled"],
                      str(tmp_path / "siamese"))  # fmt: skip
    out = str(tmp_path / "embed")
    stats = infer(InferConfig(shards=digits_shards["test"][:2], checkpoint=ckpt, out=out,
                              features=True, num_workers=0, device="cpu"))  # fmt: skip
    assert sum(s.images for s in stats) == 200
    files = source.embedding_files(os.path.join(out, "features"))
    assert source.embedding_dim(files[0]) == 8
    assert source.model_of(files[0]) == models.model_id(ckpt)
    _, _, x = next(source.iter_embeddings(files))
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)  # normalized
    # The same vectors as the model gives in memory.
    model, info = models.load_model(ckpt)
    from cvpipe.data.shards import Reject, iter_shard

    first = next(s for s in iter_shard(digits_shards["test"][0]) if not isinstance(s, Reject))
    import torch

    with torch.no_grad():
        z = model.eval()(models.preprocess(info)(first.image)[None]).numpy()
    np.testing.assert_allclose(x[0], z[0], atol=1e-5)
    preds = tables.read_parquet(os.path.join(out, "predictions", "test", "digits-000000.parquet"))
    assert preds.column("classes").to_pylist()[0] == []  # no class scores
    with pytest.raises(ValueError, match="features on"):
        infer(InferConfig(shards=digits_shards["test"][:1], checkpoint=ckpt,
                          out=str(tmp_path / "nofeat"), num_workers=0, device="cpu"))  # fmt: skip


@pytest.mark.slow
def test_siamese_study_runs_on_the_digits(prefect_harness, tmp_path):
    from cvpipe.experiments.siamese import SiameseConfig
    from flows.siamese import siamese_flow

    cfg = SiameseConfig(root=str(tmp_path / "study"), seeds=[0, 1], ks=[1, 5], device="cpu",
                        siamese=_small(epochs=8), teacher_train=_small(epochs=8))  # fmt: skip
    result = siamese_flow(cfg)
    t = tables.read_parquet(result["table"])
    rows = t.to_pylist()
    assert {(r["features"], r["seed"], r["k"]) for r in rows} == {
        (f, s, k) for f in ("siamese", "teacher", "random") for s in (0, 1) for k in (1, 5)
    }
    assert all(r["index_kind"] == "ivf" and 0 <= r["recall"] <= 1 for r in rows)
    assert all(r["queries"] == rows[0]["queries"] > 600 for r in rows)
    mean = {f: np.mean([r["precision"] for r in rows if r["features"] == f and r["k"] == 5])
            for f in ("siamese", "teacher", "random")}  # fmt: skip
    # Learned features retrieve same-digit neighbours far above random-init ones.
    assert mean["siamese"] > mean["random"] + 0.1 and mean["teacher"] > mean["random"] + 0.1
    assert "| siamese | 5 | 2 |" in result["markdown"]
    for png in result["projections"].values():
        assert storage.read_bytes(png)[:8] == b"\x89PNG\r\n\x1a\n"
    again = siamese_flow(cfg)  # every step committed: read back, same table
    assert again["markdown"] == result["markdown"]


def test_index_commands(prefect_harness, digits_shards, tmp_path):
    from flows.cli import app

    ckpt = loop.train(ContrastiveTask(dim=8), _small(), digits_shards["labeled"],
                      str(tmp_path / "siamese"))  # fmt: skip
    emb = str(tmp_path / "embed")
    infer(InferConfig(shards=digits_shards["test"], checkpoint=ckpt, out=emb, features=True,
                      num_workers=0, device="cpu"))  # fmt: skip
    feats = os.path.join(emb, "features")
    runner = CliRunner()
    ix = str(tmp_path / "ix")

    def ok(*args):
        r = runner.invoke(app, list(args))
        assert r.exit_code == 0, r.output
        return r.output

    ok("index", "build", os.path.join(feats, "test", "digits-000000.parquet"), "--out", ix,
       "--kind", "flat", "--memory", "1G", "--threads", "1")  # fmt: skip
    out = ok("index", "add", ix, os.path.join(feats, "test", "digits-000001.parquet"))
    assert "200" in out  # vectors in the index after the add
    nb = str(tmp_path / "nb.parquet")
    ok("index", "query", ix, "--embeddings", feats + "/test/digits-000001.parquet", "-k", "5",
       "--out", nb)  # fmt: skip
    t = tables.read_parquet(nb)
    assert t.num_rows == 100 and t.schema.field("neighbors").type == pa.list_(pa.string())
    key = t.column("key")[0].as_py()
    shards = digits_shards["test"][0].rsplit("/", 1)[0]
    out = ok("index", "query", ix, "--key", key, "-k", "3", "--sheet",
             str(tmp_path / "sheet.png"), "--shards", shards)  # fmt: skip
    assert t.column("neighbors")[0].as_py()[0] in out
    assert storage.read_bytes(str(tmp_path / "sheet.png"))[:4] == b"\x89PNG"
    img = str(tmp_path / "q.png")
    from cvpipe.data.shards import Reject, iter_shard

    first = next(s for s in iter_shard(digits_shards["test"][0]) if not isinstance(s, Reject))
    first.image.save(img)
    out = ok("index", "query", ix, "--image", img, "--model", ckpt, "-k", "3")
    assert first.key in out  # the image's own vector is its nearest
    dups = str(tmp_path / "dups.parquet")
    ok("dedup", ix, "--threshold", "1e-4", "--out", dups)
    assert tables.read_parquet(dups).num_rows == 0  # no two digits are the same image
    bad = runner.invoke(app, ["index", "query", ix, "--key", key, "--image", img])
    assert bad.exit_code != 0 and "exactly one" in bad.output
    bad = runner.invoke(app, ["index", "build", feats, "--out", ix, "--kind", "hnsw"])
    assert bad.exit_code != 0 and "--kind" in bad.output


def test_siamese_train_command(prefect_harness, digits_shards, tmp_path):
    from flows.cli import app

    cfg = tmp_path / "siamese.yaml"
    cfg.write_text(
        "dim: 8\npositive_fraction: 0.5\nhard_negatives: 0.5\n"
        "train: {arch: small_cnn, input_size: 16, epochs: 2, batch_size: 32, cpu_threads: 1,"
        " device: cpu}\n"
    )
    shards = digits_shards["labeled"][0].rsplit("/", 1)[0]
    out = str(tmp_path / "run")
    r = CliRunner().invoke(app, ["siamese", "train", shards, "--out", out, "--config", str(cfg),
                                 "--margin", "0.5"])  # fmt: skip
    assert r.exit_code == 0, r.output
    info = models.load_info(os.path.join(out, "final.pt"))
    assert info.task == "contrastive"
    assert info.lineage["task"]["margin"] == 0.5 and info.lineage["task"]["hard_negatives"] == 0.5
    assert info.lineage["train_config"]["epochs"] == 2
    bad = CliRunner().invoke(app, ["siamese", "train", shards, "--out", out,
                                   "--positive-fraction", "2"])  # fmt: skip
    assert bad.exit_code != 0 and "--positive-fraction" in bad.output
