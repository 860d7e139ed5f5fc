"""The two experiments as flows, at toy size: every stage's output feeds the next."""

import csv
import io

import pytest
from rich.console import Console

from cvpipe import models
from cvpipe.core import storage, tables
from cvpipe.data import shards
from cvpipe.experiments.config import AnchorTransferConfig, SemiSupervisedConfig
from tasks import progress
from tasks.artifacts import artifact_key


def _artifact_keys(*keys: str) -> set[str]:
    """Which of ``keys`` the API holds artifacts under."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def read() -> set[str]:
        async with get_client() as client:
            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=list(keys)))
            )
            return {a.key for a in found}

    return run_coro_as_sync(read())


TINY = {
    "arch": "small_cnn",
    "input_size": 16,
    "batch_size": 32,
    "lr": 0.05,
    "augmentation": "shift",
    "cpu_threads": 1,
    "keep_checkpoints": 1,
}


@pytest.mark.slow
def test_semi_supervised_flow_wires_every_stage(prefect_harness, tmp_path):
    from flows.semi_supervised import semi_supervised_flow

    root = str(tmp_path / "ssl")
    config = SemiSupervisedConfig(
        root=root,
        digits={"labeled_fraction": 0.1, "test_fraction": 0.3, "size": 16, "shard_size": 300},
        seeds=[0],
        teacher={**TINY, "epochs": 3},
        student={**TINY, "epochs": 2},
        finetune={**TINY, "epochs": 2, "lr": 0.01},
        baseline={**TINY, "epochs": 3},
        top_p=1,
        top_k=20,
        sweep_top_k=[10],
        sweep_unlabeled_fraction=[0.5],
    )
    terminal = io.StringIO()
    progress.enable(Console(file=terminal, width=150))
    try:
        out = semi_supervised_flow(config)
    finally:
        progress.enable(None)
    results = tables.read_parquet(f"{root}/results.parquet").to_pylist()
    assert sorted(r["method"] for r in results) == sorted(
        ["teacher", "supervised", "student_pretrained", "student_finetuned"]
    )
    assert set(out["gains"]) == {0}
    assert "beats the supervised baseline" in storage.read_bytes(f"{root}/results.md").decode()
    runs = tables.read_parquet(f"{root}/runs.parquet").to_pylist()
    settings = {(r["top_k"], r["unlabeled_fraction"]) for r in runs}
    assert settings == {(20, 1.0), (10, 1.0), (20, 0.5)}
    for name in ("sweep_top_k", "sweep_unlabeled", "results_per_seed"):
        assert storage.read_bytes(f"{root}/{name}.png")[:4] == b"\x89PNG"
    # What a person sees: phase headers and a bar per stage in the terminal; in the UI
    # the results (a table that renders: |D| escaped) and the teacher's curves, keyed
    # by where they were written.
    shown = terminal.getvalue()
    for phase in ("seed 1/1: teacher", "seed 1/1: teacher inference on U",
                  "seed 1/1: student (K=20, 100% of U)", "infer", "units"):  # fmt: skip
        assert phase in shown, phase
    assert "\\|D\\|" in storage.read_bytes(f"{root}/results.md").decode()

    # The wiring: D^ was selected by this teacher, the student pretrained on D^, the
    # fine-tuned student started from that student.
    seed_dir = f"{root}/seed-0"
    teacher = storage.list_committed(seed_dir, "final.pt", recursive=True)[0]
    assert teacher.endswith(f"teacher-{tables.config_hash(config.teacher)[:8]}/final.pt")
    teacher_dir = teacher.rsplit("/", 1)[0]
    assert storage.read_bytes(f"{teacher_dir}/curves.png")[:4] == b"\x89PNG"
    wanted = [
        artifact_key("semi-supervised-results", location=root),
        artifact_key("training-curves", location=teacher_dir),
        artifact_key("per-class-accuracy", location=f"{teacher_dir}/eval"),
    ]
    assert _artifact_keys(*wanted) == set(wanted)
    variant = teacher.rsplit("/", 1)[0] + "/p1-k20-u1"
    pseudo = storage.expand_urls(f"{variant}/pseudo/shards", ".tar")
    samples = [s for u in pseudo for s in shards.read_shard_samples(u, decode=False)[0]]
    selected = tables.read_parquet(f"{variant}/select/selection.parquet")
    assert len(samples) == selected.num_rows > 0
    per_label = {}
    for s in samples:
        per_label[s.meta["label"]] = per_label.get(s.meta["label"], 0) + 1
    assert max(per_label.values()) <= 20  # at most K per class
    assert {s.meta["pseudo"]["teacher"] for s in samples} == {models.model_id(teacher)}
    student, finetuned = (
        storage.list_committed(variant, "final.pt", recursive=True)[i] for i in (1, 0)
    )
    assert "student-" in student and "finetuned-" in finetuned
    assert models.load_info(finetuned).lineage["init_checkpoint"] == student
    assert models.load_info(student).lineage["train_shards"] == len(pseudo)

    # The scores are those of these checkpoints on the test split (the baseline is
    # configured like the teacher, so it is the teacher's run).
    from cvpipe.learn import training

    test = storage.list_committed(f"{seed_dir}/data/shards/test", ".tar")
    ckpts = {"teacher": teacher, "supervised": teacher, "student_pretrained": student,
             "student_finetuned": finetuned}  # fmt: skip
    for r in results:
        with models.cpu_threads(1):
            scored = training.evaluate(ckpts[r["method"]], test, device="cpu")
        assert (r["top1"], r["top5"]) == (scored.top1, scored.top5), r["method"]
    # |D|, |D^| and the precision of D^ against U's hidden labels, counted here
    labeled = storage.list_committed(f"{seed_dir}/data/shards/labeled", ".tar")
    truth_csv = storage.read_bytes(f"{seed_dir}/data/png/unlabeled_truth.csv").decode()
    hidden = {r["image"]: r["label"] for r in csv.DictReader(io.StringIO(truth_csv))}
    right = sum(hidden[s.meta["source"].rsplit("/", 1)[-1]] == s.meta["label"] for s in samples)
    main = [r for r in runs if (r["top_k"], r["unlabeled_fraction"]) == (20, 1.0)]
    assert len(main) == 4
    for r in main:
        assert r["labeled"] == sum(len(shards.read_shard_samples(u)[0]) for u in labeled)
        assert r["pseudo"] == len(samples)
        assert r["precision"] == pytest.approx(right / len(samples))


@pytest.mark.slow
def test_anchor_transfer_flow_gives_both_tables(prefect_harness, tmp_path):
    from flows.anchor_labels import anchor_transfer_flow

    root = str(tmp_path / "anchors")
    config = AnchorTransferConfig(
        root=root,
        digits={
            "anchor_groups": {"a": "01", "b": "23", "c": "45"},
            "target_groups": {"t": "89"},
            "shard_size": 300,
        },
        methods=[
            {"method": "nearest", "n": 2},
            {"method": "random", "n_labels": 3},
            {"method": "vanilla"},
        ],
        reference={**TINY, "epochs": 2},
        source={**TINY, "epochs": 2},
        finetune={**TINY, "epochs": 2, "new_head": True},
    )
    out = anchor_transfer_flow(config)
    transfer = tables.read_parquet(f"{root}/transfer.parquet").to_pylist()
    assert [r["target"] for r in transfer] == ["t"]
    # Each cell is the top-1 of that method's fine-tuned model on the target's test
    # images, and "best" is the row's highest (the first of equals).
    from cvpipe.learn import training

    methods = ["nearest-2", "random", "vanilla", "scratch"]
    test = storage.list_committed(f"{root}/data/shards/target-t-test", ".tar")
    for m in methods:
        with models.cpu_threads(1):
            scored = training.evaluate(f"{root}/targets/t/{m}/final.pt", test, device="cpu")
        assert transfer[0][m] == scored.top1, m
    top = max(transfer[0][m] for m in methods)
    assert transfer[0]["best"] == next(m for m in methods if transfer[0][m] == top)
    pseudo = {
        r["method"]: r for r in tables.read_parquet(f"{root}/pseudo_labels.parquet").to_pylist()
    }
    assert pseudo["nearest-2"]["labels"] <= 6  # ordered pairs of 3 anchors
    assert pseudo["random"]["labels"] == 3
    assert pseudo["vanilla"]["labels"] == 10  # U holds every digit
    # every image of U gets one label from each method
    u = storage.list_committed(f"{root}/data/shards/unlabeled", ".tar")
    n_u = sum(len(shards.read_shard_samples(x, decode=False)[0]) for x in u)
    assert {r["images"] for r in pseudo.values()} == {n_u}
    assert "**" in out["transfer"]  # the best of the row is marked
    assert storage.read_bytes(f"{root}/pseudo_labels_sizes.png")[:4] == b"\x89PNG"


def test_chop_cli_reports_every_depth_and_mode(prefect_harness, digits_shards, tmp_path):
    from typer.testing import CliRunner

    from cvpipe.learn import training
    from cvpipe.learn.config import TrainConfig
    from flows.cli import app

    base = training.train(
        TrainConfig(**TINY, epochs=1), digits_shards["labeled"], str(tmp_path / "base")
    )
    train_yaml = tmp_path / "train.yaml"
    train_yaml.write_text("epochs: 1\nbatch_size: 32\ninput_size: 16\ncpu_threads: 1\n")
    out = str(tmp_path / "chop")
    r = CliRunner().invoke(
        app,
        [
            "chop",
            digits_shards["labeled"][0].rsplit("/", 1)[0],
            "--from",
            base,
            "--test",
            digits_shards["test"][0],
            "--out",
            out,
            "--config",
            str(train_yaml),
        ],
    )
    assert r.exit_code == 0, r.output
    rows = tables.read_parquet(f"{out}/chop.parquet").to_pylist()
    assert sorted((row["n"], row["mode"]) for row in rows) == sorted(
        [(n, m) for n in range(4) for m in ("finetuned", "frozen")]
    )
    assert storage.read_bytes(f"{out}/chop.png")[:4] == b"\x89PNG"
