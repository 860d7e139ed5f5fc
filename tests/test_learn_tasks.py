"""The training tasks beyond classification, each against its formula and through the
shared loop: multi-label soft targets (Joulin et al. 2016), contrastive pairs (Hadsell
et al. 2006), detection (Faster R-CNN with box-aware transforms)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from conftest import ingest_folder
from PIL import Image, ImageDraw

from cvpipe import models
from cvpipe.core import tables
from cvpipe.learn import loop, training
from cvpipe.learn.config import TrainConfig
from cvpipe.learn.tasks import ContrastiveTask, DetectionTask, MultiLabelTask
from cvpipe.learn.tasks.contrastive import contrastive_loss, next_pairs
from cvpipe.learn.tasks.detection import LOSS_PARTS, detection_transform
from cvpipe.learn.tasks.multilabel import precision_at_k, soft_target_loss, soft_targets

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small(**kw) -> TrainConfig:
    base = dict(arch="small_cnn", input_size=16, epochs=2, batch_size=32, lr=0.05,
                shuffle_buffer=64, device="cpu", seed=3)  # fmt: skip
    return TrainConfig(**{**base, **kw})


# --------------------------------------------------------------------------- multi-label

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
VOCAB = [*WORDS, "even", "odd"]


def test_soft_target_loss_equals_a_hand_computation():
    logits = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
    # Image 0 has words {0, 1} (y = 1/2 each), image 1 has word {2} (y = 1).
    y = soft_targets(torch.tensor([0, 0, 1]), torch.tensor([0, 1, 2]),
                     torch.tensor([0.5, 0.5, 1.0]), 2, 3)  # fmt: skip
    assert y.sum(dim=1).tolist() == [1.0, 1.0]

    def log_softmax(row: list[float], k: int) -> float:
        return row[k] - math.log(sum(math.exp(v) for v in row))

    rows = logits.tolist()
    hand = -0.5 * (
        0.5 * log_softmax(rows[0], 0) + 0.5 * log_softmax(rows[0], 1) + log_softmax(rows[1], 2)
    )
    assert soft_target_loss(logits, y).item() == pytest.approx(hand, rel=1e-6)
    # The same through the task: sparse targets from collate, dense on the device.
    task = MultiLabelTask()
    items = [
        {"image": torch.zeros(3, 2, 2), "words": [0, 1], "key": "a", "shard": "s"},
        {"image": torch.zeros(3, 2, 2), "words": [], "key": "b", "shard": "s"},
        {"image": torch.zeros(3, 2, 2), "words": [2], "key": "c", "shard": "s"},
    ]
    batch = task.collate(items)
    assert (batch.size, batch.skipped) == (2, 1)  # no in-vocabulary word: skipped, counted
    loss, _ = task.forward_loss(lambda x: logits, batch, small())
    assert loss.item() == pytest.approx(hand, rel=1e-6)


def test_precision_at_k_counts_predicted_words_among_the_image_words():
    logits = torch.tensor([[0.9, 0.8, 0.1, 0.0], [0.0, 0.1, 0.2, 0.9]])
    y = torch.tensor([[0.5, 0.0, 0.5, 0.0], [0.0, 0.0, 0.0, 1.0]])
    assert precision_at_k(logits, y, 1).tolist() == [1.0, 1.0]
    assert precision_at_k(logits, y, 2).tolist() == [0.5, 0.5]
    assert precision_at_k(logits, y, 3).tolist() == pytest.approx([2 / 3, 1 / 3])


@pytest.fixture(scope="module")
def tagged_shards(digits_dir: Path, tmp_path_factory) -> list[str]:
    """The labeled digits with hashtags: the digit's word and its parity."""
    root = tmp_path_factory.mktemp("tagged")
    manifest = root / "manifest.jsonl"
    with manifest.open("w") as f:
        for png in sorted((digits_dir / "labeled").glob("*/*.png")):
            d = int(png.parent.name)
            tags = [WORDS[d], "even" if d % 2 == 0 else "odd", "#unknown"]
            f.write(json.dumps({"image": str(png), "hashtags": tags}) + "\n")
    return ingest_folder(str(manifest), str(root / "root"), "tagged", "digits", 100)


def test_multilabel_run_learns_word_prediction(tagged_shards, tmp_path):
    cfg = small(epochs=4, classes=VOCAB)
    ckpt = loop.train(MultiLabelTask(), cfg, tagged_shards, str(tmp_path), val_urls=tagged_shards)
    table = tables.read_parquet(training.metrics_url(str(tmp_path)))
    assert table.schema.remove_metadata().equals(tables.metrics_schema(MultiLabelTask.metric_names))
    rows = table.to_pylist()
    train_rows = [r for r in rows if r["split"] == "train"]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    # Two words per image: precision@1 can reach 1, precision@5 at most 2/5.
    val = [r for r in rows if r["split"] == "val"][-1]
    assert val["precision_at_1"] > 0.5 and val["precision_at_5"] <= 0.4 + 1e-9
    model, info = models.load_checkpoint(ckpt)  # a classifier with one output per word
    assert info.task == "multilabel" and info.classes == VOCAB
    assert model.head.out_features == len(VOCAB)


def test_multilabel_needs_a_vocabulary(tagged_shards, tmp_path):
    with pytest.raises(training.TrainingError, match="vocabulary"):
        loop.train(MultiLabelTask(), small(), tagged_shards, str(tmp_path))


# --------------------------------------------------------------------------- contrastive


def test_contrastive_loss_follows_the_formula():
    a = torch.zeros(1, 2)
    d = 0.6
    b = torch.tensor([[0.0, d]])
    similar, dissimilar = torch.tensor([0]), torch.tensor([1])
    assert contrastive_loss(a, b, similar, margin=1.0).item() == pytest.approx(d**2 / 2)
    assert contrastive_loss(a, b, dissimilar, margin=0.5).item() == 0.0  # beyond margin
    assert contrastive_loss(a, b, dissimilar, margin=1.0).item() == pytest.approx((1 - d) ** 2 / 2)
    # A batch averages over its pairs.
    both = contrastive_loss(torch.cat([a, a]), torch.cat([b, b]), torch.tensor([0, 1]), 1.0)
    assert both.item() == pytest.approx((d**2 / 2 + (1 - d) ** 2 / 2) / 2)
    # Equal embeddings of a dissimilar pair push apart (a finite gradient, not NaN).
    x = torch.zeros(1, 2, requires_grad=True)
    contrastive_loss(x, torch.zeros(1, 2), dissimilar, 1.0).backward()
    assert torch.isfinite(x.grad).all()


def test_pairs_are_mined_with_the_next_sample_of_each_kind():
    first, second, y = next_pairs([0, 1, 0, 2])
    pairs = set(zip(first, second, y, strict=True))
    assert pairs == {
        (0, 2, 0), (0, 1, 1), (1, 2, 1), (2, 0, 0), (2, 3, 1), (3, 0, 1),
    }  # fmt: skip
    assert next_pairs([5]) == ([], [], [])  # a lone sample has no partner


def test_contrastive_run_separates_classes_and_saves_an_embedding_net(digits_shards, tmp_path):
    base = training.train(small(epochs=1), digits_shards["labeled"], str(tmp_path / "base"))
    task = ContrastiveTask(dim=8, margin=1.0)
    out = str(tmp_path / "siamese")
    ckpt = loop.train(task, small(epochs=3), digits_shards["labeled"], out,
                      val_urls=digits_shards["test"][:1], init_checkpoint=base)  # fmt: skip
    model, info = task.load(ckpt)
    assert info.task == "contrastive" and isinstance(model, models.EmbeddingNet)
    assert models.load_info(ckpt).lineage["init_model_id"] == models.model_id(base)
    # The run started from the classifier's backbone (every tensor), with a fresh head.
    start = task.build(small(), digits_shards["labeled"], base).model.state_dict()
    classifier = models.load_checkpoint(base)[0].state_dict()
    backbone = [k for k in start if k.startswith("backbone.")]
    assert backbone and all(torch.equal(start[k], classifier[k]) for k in backbone)
    assert start["head.weight"].shape == (8, classifier["head.weight"].shape[1])
    rows = tables.read_parquet(training.metrics_url(out)).to_pylist()
    val = [r for r in rows if r["split"] == "val"][-1]
    assert val["similar_distance"] < val["dissimilar_distance"]
    with torch.no_grad():
        z = model.eval()(torch.randn(4, 3, 16, 16))
    assert z.shape == (4, 8) and torch.allclose(z.norm(dim=1), torch.ones(4), atol=1e-5)


# --------------------------------------------------------------------------- detection


def _bright_box(image: torch.Tensor) -> list[float]:
    """[x1, y1, x2, y2] of the pixels brighter than half (x2, y2 exclusive)."""
    ys, xs = torch.nonzero(image.mean(0) > 0.5, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_flip_and_resize_keep_boxes_on_their_objects():
    from torchvision import tv_tensors

    w, h, box = 120, 80, [10, 20, 50, 60]
    img = Image.new("RGB", (w, h), (0, 0, 0))
    ImageDraw.Draw(img).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=(255,) * 3)
    boxes = tv_tensors.BoundingBoxes(torch.tensor([box], dtype=torch.float32), format="XYXY",
                                     canvas_size=(h, w))  # fmt: skip
    target = {"boxes": boxes, "labels": torch.tensor([1])}
    torch.manual_seed(0)
    tf = detection_transform(train=True, min_size=40, max_size=100, flip=True)
    flipped = 0
    for _ in range(8):  # the flip is random: both outcomes must keep the box aligned
        out, t = tf(img, target)
        assert out.shape == (3, 40, 60)  # short side 80 -> 40
        got = t["boxes"][0].tolist()
        assert got == pytest.approx(_bright_box(out), abs=1.0)
        flipped += got[0] > 20
    assert 0 < flipped < 8
    # A box that leaves the image after clamping to nothing is dropped with its label.
    gone = tv_tensors.BoundingBoxes(torch.tensor([box, [130.0, 0, 140, 10]]), format="XYXY",
                                    canvas_size=(h, w))  # fmt: skip
    _, t = detection_transform(False, 40, 100)(img, {"boxes": gone, "labels": torch.tensor([1, 2])})
    assert t["labels"].tolist() == [1] and len(t["boxes"]) == 1


@pytest.fixture(scope="module")
def canvas_shards(tmp_path_factory) -> list[str]:
    """Four 96x96 canvases with one or two red or green squares and their boxes."""
    root = tmp_path_factory.mktemp("canvases")
    rng = random.Random(0)
    with (root / "manifest.jsonl").open("w") as f:
        for i in range(4):
            img = Image.new("RGB", (96, 96), (40, 40, 40))
            draw, boxes = ImageDraw.Draw(img), []
            for _ in range(rng.randint(1, 2)):
                s, label = rng.randint(24, 40), rng.choice(["red", "green"])
                x, y = rng.randint(0, 96 - s), rng.randint(0, 96 - s)
                color = (230, 30, 30) if label == "red" else (30, 230, 30)
                draw.rectangle([x, y, x + s - 1, y + s - 1], fill=color)
                boxes.append({"bbox": [x, y, x + s, y + s], "label": label})
            img.save(root / f"{i}.png")
            f.write(json.dumps({"image": f"{i}.png", "boxes": boxes}) + "\n")
    return ingest_folder(str(root / "manifest.jsonl"), str(root / "root"), "c", "canvas", 100)


@pytest.mark.slow
def test_detector_training_lowers_the_loss_and_saves_a_detector(canvas_shards, tmp_path):
    task = DetectionTask(min_size=64, max_size=96)
    cfg = TrainConfig(arch="fasterrcnn_mobilenet_v3_large_fpn", epochs=3, batch_size=2,
                      lr=0.02, scheduler="constant", shuffle_buffer=0, device="cpu",
                      seed=0)  # fmt: skip
    ckpt = loop.train(task, cfg, canvas_shards, str(tmp_path))
    rows = tables.read_parquet(training.metrics_url(str(tmp_path))).to_pylist()
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[-1]["loss"] < 0.8 * rows[0]["loss"]
    # The loss is the sum of the loss parts (validation rows add mAP, not a loss part).
    assert rows[0]["loss"] == pytest.approx(sum(rows[0][k] for k in LOSS_PARTS), rel=1e-4)
    # A model without a classification head is saved and loads back, weights intact.
    model, info = task.load(ckpt)
    assert info.task == "detection" and info.classes == ["green", "red"]
    state, _ = models.load_state(ckpt)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(models.CheckpointError, match="not a classifier"):
        models.load_checkpoint(ckpt)
