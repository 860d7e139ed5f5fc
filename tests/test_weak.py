"""Weak labels through the training loop: targets from captions reach the Joulin loss
exactly, sqrt resampling draws, word prediction scored against the frequency baseline
by hand, and the output layer as a word embedding."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from weakdata import write_captioned_shard

from cvpipe import models
from cvpipe.label.config import TargetsConfig, VocabConfig
from cvpipe.label.targets import build_targets
from cvpipe.label.vocab import build_vocab, read_vocab
from cvpipe.learn import loop
from cvpipe.learn.config import TrainConfig
from cvpipe.learn.errors import TrainingError
from cvpipe.learn.tasks.weak import WeakTask
from cvpipe.learn.weak import FREQUENCY, nearest_words, score_words

CAPTIONS = [
    {"caption": "a cat and a dog", "hashtags": ["#Cat"]},  # cat, dog
    {"caption": "the of"},  # no word
    {"caption": "dog"},
    {"caption": "bird, cat; dog!"},  # cat, dog, bird
    {"caption": "Dog dog"},
    {"caption": "cat"},
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def captioned(tmp_path):
    url = str(tmp_path / "shards" / "p" / "c-000000.tar")
    keys = write_captioned_shard(url, CAPTIONS, "c")
    vocab = str(tmp_path / "vocab.parquet")
    build_vocab(VocabConfig(shards=url, out=vocab, size=3))
    targets = str(tmp_path / "targets")
    build_targets(TargetsConfig(shards=url, vocab=vocab, out=targets, resample="sqrt"))
    return {"url": url, "keys": keys, "vocab": vocab, "targets": targets, "tmp": tmp_path}


def small(**kw) -> TrainConfig:
    base = dict(arch="small_cnn", input_size=8, epochs=1, batch_size=8, lr=0.05,
                shuffle_buffer=0, device="cpu", seed=0, augmentation="none")  # fmt: skip
    return TrainConfig(**{**base, **kw})


def test_captions_to_loss_equal_a_hand_computation(captioned):
    vocab = read_vocab(captioned["vocab"])
    assert vocab.words == ["dog", "cat", "bird"]  # counts 5, 3, 1
    task = WeakTask(targets=captioned["targets"], vocab=captioned["vocab"])
    info = models.ModelInfo("small_cnn", vocab.words, 8, (0.5,) * 3, (0.5,) * 3)
    items = list(task.dataset(small(), [captioned["url"]], info, stage="t", train=False))
    assert [it["words"] for it in items] == [[0, 1], [], [0], [0, 1, 2], [0], [1]]
    batch = task.collate(items)
    assert (batch.size, batch.skipped) == (5, 1)
    logits = torch.tensor(
        [[1.0, 0.0, -1.0], [0.5, 0.5, 0.5], [2.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 2.0, 3.0]]
    )
    targets = [[0, 1], [0], [0, 1, 2], [0], [1]]

    def log_softmax(row, k):
        return row[k] - math.log(sum(math.exp(v) for v in row))

    rows = logits.tolist()
    hand = -sum(
        sum(log_softmax(rows[n], k) / len(ws) for k in ws) for n, ws in enumerate(targets)
    ) / len(targets)
    loss, (_, y) = task.forward_loss(lambda x: logits, batch, small())
    assert loss.item() == pytest.approx(hand, rel=1e-6)
    assert y.sum(dim=1).tolist() == pytest.approx([1.0] * 5)  # targets sum to 1


def test_missing_targets_are_a_clear_error(captioned, tmp_path):
    task = WeakTask(targets=str(tmp_path / "none"))
    info = models.ModelInfo("small_cnn", ["dog"], 8, (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(TrainingError, match="no word targets"):
        list(task.dataset(small(), [captioned["url"]], info, stage="t", train=False))


def test_sqrt_resampling_draws_about_weight_times_scale(captioned):
    from cvpipe.label.targets import read_targets, resample_scale

    table = read_targets(f"{captioned['targets']}/p/c-000000.parquet")
    scale = resample_scale(len(table), sum(w for _, w in table.values()))
    task = WeakTask(targets=captioned["targets"], resample_scale=scale)
    info = models.ModelInfo("small_cnn", ["dog", "cat", "bird"], 8, (0.5,) * 3, (0.5,) * 3)
    ds = task.dataset(small(), [captioned["url"]], info, stage="t", train=True)
    seen: Counter = Counter()
    epochs = 300
    for e in range(epochs):
        ds.set_epoch(e)
        seen.update(it["key"] for it in ds if "key" in it)
    keys = captioned["keys"]
    assert seen[keys[1]] == epochs  # no word: once per epoch, skipped by collate
    for i, k in enumerate(keys):
        if k in table:
            want = table[k][1] * scale
            assert seen[k] / epochs == pytest.approx(want, abs=0.12), i
    # Rarer words are drawn more often per sample: "bird" (count 1) in sample 3.
    assert seen[keys[3]] > seen[keys[4]]
    ds.set_epoch(7)
    first = [it["key"] for it in ds if "key" in it]
    ds.set_epoch(7)
    assert [it["key"] for it in ds if "key" in it] == first  # seeded


def test_frequency_baseline_and_model_precision_by_hand(captioned):
    vocab = read_vocab(captioned["vocab"])
    # A model that always puts "bird" first, then "cat", then "dog".
    torch.manual_seed(0)
    model = models.build("small_cnn", 3)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([0.0, 1.0, 2.0]))
    ckpt = str(captioned["tmp"] / "m.pt")
    info = models.ModelInfo("small_cnn", vocab.words, 8, (0.5,) * 3, (0.5,) * 3, task="multilabel")
    models.save_checkpoint(model, info, ckpt)
    result = score_words(ckpt, [captioned["url"]], captioned["targets"], show=["cat"],
                         top_images=2, device="cpu")  # fmt: skip
    # Word sets of the 5 samples with words: {dog,cat} {dog} {dog,cat,bird} {dog} {cat}.
    assert result.images == 5 and result.skipped == 1
    # Frequency: predicts dog, then cat, bird. P@1: dog in 4 of 5.
    assert result.precision[FREQUENCY][1] == pytest.approx(4 / 5)
    # P@5 over 3 words predicts all 3 (k is capped at V): (2 + 1 + 3 + 1 + 1) / 3 / 5.
    assert result.precision[FREQUENCY][5] == pytest.approx(8 / 15)
    # The model predicts bird first: only sample 3 holds it.
    assert result.precision["model"][1] == pytest.approx(1 / 5)
    assert result.precision["model"][10] == result.precision[FREQUENCY][10]
    assert [r["rank"] for r in result.top_images] == [1, 2]
    assert {r["word"] for r in result.top_images} == {"cat"}


def test_nearest_words_by_cosine_of_the_head_rows(tmp_path):
    words = ["seven", "sept", "lucky", "zero"]
    model = models.build("small_cnn", 4)
    d = model.head.in_features
    w = torch.zeros(4, d)
    w[0, 0], w[1, 0], w[1, 1] = 1.0, 1.0, 0.1  # sept ~ seven
    w[2, 0], w[2, 2] = 0.5, 1.0  # lucky a bit like seven
    w[3, 3] = 1.0  # zero orthogonal
    with torch.no_grad():
        model.head.weight.copy_(w)
    ckpt = str(tmp_path / "w.pt")
    info = models.ModelInfo("small_cnn", words, 8, (0.5,) * 3, (0.5,) * 3, task="multilabel")
    models.save_checkpoint(model, info, ckpt)
    got = nearest_words(ckpt, "#Seven", 3)
    assert [g[0] for g in got] == ["sept", "lucky", "zero"]
    assert got[0][1] == pytest.approx(1 / math.sqrt(1.01), rel=1e-5)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        nearest_words(ckpt, "eight")
    with pytest.raises(ValueError, match="not one word"):
        nearest_words(ckpt, "seven sept")


def test_weak_run_through_the_loop_learns_and_is_a_multilabel_classifier(captioned, tmp_path):
    vocab = read_vocab(captioned["vocab"])
    task = WeakTask(targets=captioned["targets"], vocab=captioned["vocab"])
    cfg = small(epochs=3, classes=vocab.words)
    ckpt = loop.train(task, cfg, [captioned["url"]], str(tmp_path / "run"))
    model, info = models.load_checkpoint(ckpt)
    assert info.task == "multilabel" and info.classes == vocab.words
    assert info.lineage["task"]["kind"] == "weak"
    assert info.lineage["task"]["targets"] == captioned["targets"]


def test_replicas_of_a_sample_are_augmented_apart(captioned):
    from cvpipe.label.targets import read_targets, resample_scale

    table = read_targets(f"{captioned['targets']}/p/c-000000.parquet")
    scale = resample_scale(len(table), sum(w for _, w in table.values())) * 4  # ~4 draws each
    task = WeakTask(targets=captioned["targets"], resample_scale=scale)
    info = models.ModelInfo("small_cnn", ["dog", "cat", "bird"], 8, (0.5,) * 3, (0.5,) * 3)
    ds = task.dataset(small(augmentation="shift", shift_px=2), [captioned["url"]], info,
                      stage="t", train=True)  # fmt: skip
    by_key: dict[str, list[torch.Tensor]] = {}
    for it in ds:
        if "key" in it:
            by_key.setdefault(it["key"], []).append(it["image"])
    # Sample 0's image is all black (tiny_png(0)): every shift of it looks the same.
    black = captioned["keys"][0]
    replicated = [imgs for k, imgs in by_key.items() if len(imgs) > 1 and k != black]
    assert replicated
    assert all(any(not torch.equal(imgs[0], x) for x in imgs[1:]) for imgs in replicated)
