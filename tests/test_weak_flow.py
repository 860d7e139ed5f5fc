"""Weak supervision end to end under Prefect: synthetic digit captions from the CLI,
ingested, the vocabulary flow with synonyms, and its one-line errors."""

import pytest
from typer.testing import CliRunner

from cvpipe.core import storage, tables
from cvpipe.label.vocab import read_vocab


@pytest.fixture(scope="module")
def captioned_digits(tmp_path_factory, prefect_harness):
    """The digits with synthetic captions (CLI), the unlabeled and test parts ingested."""
    from flows.cli import app

    runner = CliRunner()
    base = tmp_path_factory.mktemp("weak")
    png, root = str(base / "png"), str(base / "root")
    split = "labeled=0.1,unlabeled=0.6,test=0.3"
    res = runner.invoke(
        app, ["datasets", "digits", png, "--size", "16", "--split", split, "--captions"]
    )
    assert res.exit_code == 0, res.output
    assert "captions/unlabeled.csv" in res.output
    for part in ("unlabeled", "test"):
        res = runner.invoke(
            app,
            ["ingest", f"{png}/captions/{part}.csv", "--out", root, "--partition", part,
             "--shard-size", "200", "--name", "digits"],
        )  # fmt: skip
        assert res.exit_code == 0, res.output
    return {"png": png, "root": root, "base": base}


def test_cli_vocab_on_the_bundled_digits(captioned_digits):
    from flows.cli import app

    runner = CliRunner()
    d = captioned_digits
    out = str(d["base"] / "vocab.parquet")
    shards = f"{d['root']}/shards/unlabeled"
    res = runner.invoke(
        app,
        ["vocab", shards, "--size", "40", "--min-count", "3", "--out", out,
         "--synonyms", f"{d['png']}/captions/synonyms.txt", "--fan-in", "2"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "| index | word |" in res.output
    vocab = read_vocab(out)
    digits = {"zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"}
    assert digits <= set(vocab.words)
    assert not {"sept", "7", "the", "https", "example", "org"} & set(vocab.words)
    assert min(vocab.counts) >= 3 and vocab.counts == sorted(vocab.counts, reverse=True)
    lin = tables.read_lineage(out)
    assert lin["exact"] and lin["synonyms"]["sept"] == "seven" and lin["shards"] == 6
    merges = storage.list_committed(f"{d['base']}/vocab.parts", ".parquet", recursive=True)
    assert any("/merge-2/" in u for u in merges)  # 6 leaves, fan-in 2: three levels

    again = runner.invoke(
        app,
        ["vocab", shards, "--size", "40", "--min-count", "3", "--out", out,
         "--synonyms", f"{d['png']}/captions/synonyms.txt", "--fan-in", "2"],
    )  # fmt: skip
    assert again.exit_code == 0 and read_vocab(out).words == vocab.words


def test_cli_vocab_errors_are_one_line(captioned_digits, tmp_path):
    from flows.cli import app

    runner = CliRunner()
    shards = f"{captioned_digits['root']}/shards/unlabeled"
    bad = tmp_path / "syn.txt"
    bad.write_text("seven\n")
    res = runner.invoke(
        app, ["vocab", shards, "--size", "5", "--out", str(tmp_path / "v.parquet"),
              "--synonyms", str(bad)],
    )  # fmt: skip
    assert res.exit_code == 1 and "want 'VARIANT" in res.output
    res = runner.invoke(app, ["vocab", shards, "--size", "0", "--out", str(tmp_path / "v.pq")])
    assert res.exit_code == 2 and "--size" in res.output
    res = runner.invoke(
        app, ["vocab", str(tmp_path / "none"), "--size", "5", "--out", str(tmp_path / "v.pq")]
    )
    assert res.exit_code == 1 and "error:" in res.output


def test_cli_train_weak_and_words_on_the_bundled_digits(captioned_digits):
    from flows.cli import app

    runner = CliRunner()
    d = captioned_digits
    vocab = str(d["base"] / "vocab_words.parquet")
    res = runner.invoke(
        app,
        ["vocab", f"{d['root']}/shards/unlabeled", "--size", "64", "--out", vocab,
         "--synonyms", f"{d['png']}/captions/synonyms.txt"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    out = str(d["base"] / "weak")
    args = ["train-weak", f"{d['root']}/shards/unlabeled", "--vocab", vocab, "--out", out,
            "--test", f"{d['root']}/shards/test", "--epochs", "4", "--input-size", "16",
            "--batch-size", "64", "--lr", "0.1", "--device", "cpu", "--cpu-threads", "1",
            "--show", "seven", "--show", "odd", "--top-images", "4"]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "| frequency baseline |" in res.output
    precision = {r["method"]: r for r in tables.read_parquet(f"{out}/eval/word_precision.parquet")
                 .to_pylist()}  # fmt: skip
    # Even 4 epochs beat always predicting the most frequent words.
    assert precision["model"]["p_at_1"] > precision["frequency baseline"]["p_at_1"]
    tops = tables.read_parquet(f"{out}/eval/top_images.parquet").to_pylist()
    assert {r["word"] for r in tops} == {"seven", "odd"} and max(r["rank"] for r in tops) == 4
    assert storage.read_bytes(f"{out}/eval/top_images.png")[:4] == b"\x89PNG"

    again = runner.invoke(app, args)  # committed: read back, nothing retrained
    assert again.exit_code == 0 and "| frequency baseline |" in again.output

    res = runner.invoke(app, ["words", f"{out}/final.pt", "--query", "#Sept", "-k", "3"])
    assert res.exit_code == 0, res.output
    assert "nearest words to '#Sept'" in res.output
    res = runner.invoke(app, ["words", f"{out}/final.pt", "--query", "zebra"])
    assert res.exit_code == 1 and "not in the vocabulary" in res.output


@pytest.mark.slow
def test_weak_demo_flow(prefect_harness, tmp_path):
    from flows.weak import DEMO_WORDS, weak_demo_flow

    out = str(tmp_path / "weak")
    result = weak_demo_flow(out, epochs=2)
    assert "| frequency baseline |" in result["markdown"]
    assert [r["rank"] for r in result["nearest_seven"]] == [1, 2, 3, 4, 5]
    assert "seven" not in {r["word"] for r in result["nearest_seven"]}
    tops = tables.read_parquet(f"{out}/model/eval/top_images.parquet").to_pylist()
    assert {r["word"] for r in tops} == set(DEMO_WORDS)
    assert storage.read_bytes(f"{out}/model/eval/top_images.png")[:4] == b"\x89PNG"
