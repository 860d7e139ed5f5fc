"""The weakly supervised teacher: the semi-supervised loop starts its teacher from a
given checkpoint (a fresh head on D's labels, the baseline its own run from scratch),
and the comparison tables count paired wins."""

import pytest

from cvpipe import models
from cvpipe.core import storage, tables
from cvpipe.experiments import weak_teacher as report
from cvpipe.experiments.config import SemiSupervisedConfig, WeakTeacherConfig

TINY = {"arch": "small_cnn", "input_size": 16, "batch_size": 32, "lr": 0.05,
        "augmentation": "shift", "cpu_threads": 1, "keep_checkpoints": 1}  # fmt: skip


def test_comparison_counts_paired_wins():
    scratch = [
        {"seed": s, "method": m, "top1": v}
        for s, vals in ((0, (0.80, 0.85)), (1, (0.90, 0.91)), (2, (0.70, 0.75)))
        for m, v in zip(("teacher", "student_finetuned"), vals, strict=True)
    ] + [{"seed": 0, "method": "supervised", "top1": 0.80}]
    weak = [
        {"seed": s, "method": m, "top1": v}
        for s, vals in ((0, (0.85, 0.86)), (1, (0.88, 0.93)), (2, (0.78, 0.80)))
        for m, v in zip(("teacher", "student_finetuned"), vals, strict=True)
    ]
    rows = report.comparison_rows(scratch, weak)
    assert rows[1] == {"seed": 1, "teacher_scratch": 0.90, "student_scratch": 0.91,
                       "teacher_weak": 0.88, "student_weak": 0.93}  # fmt: skip
    md = report.comparison_markdown(rows)
    assert "beats the teacher from scratch on 2 of 3 seeds (mean +3.67 points)" in md
    assert "| 1 | 90.00 | 88.00 | 91.00 | 93.00 | -2.00 | +2.00 |" in md
    assert "scratch loop's on 3 of 3" in md


def test_word_precision_table_over_seeds():
    rows = [
        {"seed": s, "epochs": 15, "method": m, "p_at_1": p, "p_at_5": p / 2, "p_at_10": p / 3}
        for s, (a, b) in enumerate(((0.5, 0.15), (0.6, 0.14)))
        for m, p in (("model", a), ("frequency baseline", b))
    ]
    md = report.precision_markdown(rows)
    assert "| model | 0.550 ± 0.071 |" in md
    assert "on 2 of 2 seeds" in md and "{0: 15, 1: 15}" in md


def test_weak_teacher_config_fills_the_loop_root_and_checks_it():
    ssl = {"digits": {}, "teacher": TINY, "student": TINY, "finetune": TINY, "baseline": TINY}
    c = WeakTeacherConfig(root="r", semi_supervised=ssl, weak=TINY)
    assert c.semi_supervised.root == "r" and c.semi_supervised.teacher_init is None
    with pytest.raises(ValueError, match="share one architecture"):
        WeakTeacherConfig(root="r", semi_supervised=ssl, weak={**TINY, "arch": "resnet18"})
    # A new defaulted field leaves the hash of existing loop configs alone.
    plain = SemiSupervisedConfig(root="r", **ssl)
    assert tables.config_hash(plain) == tables.config_hash(
        plain.model_copy(update={"teacher_init": None})
    )


@pytest.mark.slow
def test_semi_supervised_teacher_starts_from_a_weak_checkpoint(prefect_harness, tmp_path):
    from flows.semi_supervised import semi_supervised_flow

    # A "weakly supervised" model: one output per word, not per digit.
    words = ["seven", "odd", "round", "ink"]
    weak = str(tmp_path / "weak" / "seed-0.pt")
    models.save_checkpoint(
        models.build("small_cnn", len(words)),
        models.ModelInfo("small_cnn", words, 16, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        weak,
    )
    root = str(tmp_path / "ssl")
    config = SemiSupervisedConfig(
        root=root,
        digits={"labeled_fraction": 0.1, "test_fraction": 0.3, "size": 16, "shard_size": 300},
        seeds=[0],
        teacher={**TINY, "epochs": 2},
        student={**TINY, "epochs": 1},
        finetune={**TINY, "epochs": 1, "lr": 0.01},
        baseline={**TINY, "epochs": 2},
        top_k=10,
        teacher_init=str(tmp_path / "weak" / "seed-{seed}.pt"),
    )
    semi_supervised_flow(config)
    ckpts = storage.list_committed(f"{root}/seed-0", "final.pt", recursive=True)
    teacher = next(c for c in ckpts if "/teacher-" in c and "/p1-" not in c)
    baseline = next(c for c in ckpts if "/baseline-" in c)
    t, b = models.load_info(teacher), models.load_info(baseline)
    assert t.lineage["init_checkpoint"] == weak and t.lineage["init_model_id"] == models.model_id(
        weak
    )
    assert t.classes == [str(d) for d in range(10)]  # a fresh head on D's labels
    assert "init_checkpoint" not in b.lineage  # the baseline starts from scratch
    results = {r["method"]: r for r in tables.read_parquet(f"{root}/results.parquet").to_pylist()}
    assert set(results) == {"teacher", "supervised", "student_pretrained", "student_finetuned"}
