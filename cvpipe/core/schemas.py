"""The Arrow schema of every table cvpipe writes, defined once (read and written through
:mod:`cvpipe.core.tables`, which re-exports them: ``tables.PREDICTIONS``).

Every row carries the sample ``key`` and the ``shard`` it came from (``shard`` is the
shard id: ``{partition}/{name}-{index:06d}``, see :func:`cvpipe.data.shards.shard_id`).
"""

from __future__ import annotations

import pyarrow as pa

SHARD_INDEX = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("label", pa.string()),
        ("caption", pa.string()),
    ]
)

REJECTS = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),  # a short code to count by, e.g. "truncated_image"
        ("detail", pa.string()),  # the precise message
    ]
)

PREDICTIONS = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("classes", pa.list_(pa.int32())),  # top-P class indices, best first
        ("scores", pa.list_(pa.float32())),  # their softmax scores, descending
    ]
)


SELECTION = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("label", pa.int32()),
        ("score", pa.float32()),
        ("rank", pa.int32()),  # 1 = best within its label
    ]
)

ANCHORS = pa.schema(
    [
        ("anchor", pa.string()),
        ("count", pa.int64()),
        ("vector", pa.list_(pa.float32())),
    ]
)

ANCHOR_LABELS = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("method", pa.string()),
        ("label", pa.string()),
        ("anchors", pa.list_(pa.string())),
        ("distances", pa.list_(pa.float32())),
    ]
)

METRICS = pa.schema(
    [
        ("epoch", pa.int32()),
        ("split", pa.string()),
        ("loss", pa.float64()),
        ("top1", pa.float64()),
        ("top5", pa.float64()),
        ("images_per_s", pa.float64()),
    ]
)

RESULTS = pa.schema(
    [
        ("seed", pa.int64()),
        ("method", pa.string()),  # teacher | supervised | student_pretrained | student_finetuned
        ("top1", pa.float64()),
        ("top5", pa.float64()),
    ]
)

PER_CLASS = pa.schema(
    [
        ("class_index", pa.int32()),
        ("class_name", pa.string()),
        ("count", pa.int64()),  # labeled test samples of this class
        ("correct", pa.int64()),  # of them, predicted right (top-1)
        ("top1", pa.float64()),  # correct / count (NaN when count is 0)
    ]
)

CHOP = pa.schema(
    [
        ("n", pa.int32()),  # stages copied from the base model (Yosinski et al. 2014)
        ("stage", pa.string()),  # name of the n-th stage ("" for n = 0)
        ("mode", pa.string()),  # frozen | finetuned
        ("top1", pa.float64()),
        ("top5", pa.float64()),
    ]
)


# Anchor pseudo-labeling (cvpipe/anchors.py, cvpipe/reports.py).

# Map-side partial of ANCHORS: per-anchor sums (float64, so merging in any order agrees
# with one pass to float32 precision) and counts; the vector kind is in the lineage.
ANCHOR_SUMS = pa.schema(
    [
        ("anchor", pa.string()),
        ("count", pa.int64()),
        ("sum", pa.list_(pa.float64())),
    ]
)

# The frozen Uniform rule: each bucket (a Nearest-3 sequence, a Nearest-2 prefix or a
# Nearest-1 anchor), the images counted in it, and into how many hash parts it is split.
UNIFORM_RULE = pa.schema(
    [
        ("bucket", pa.string()),
        ("count", pa.int64()),
        ("parts", pa.int32()),
    ]
)

# The pseudo-label dataset table: one row per labeling method.
PSEUDO_LABEL_STATS = pa.schema(
    [
        ("method", pa.string()),
        ("labels", pa.int64()),  # distinct labels
        ("images", pa.int64()),
        ("images_per_label_mean", pa.float64()),
        ("images_per_label_std", pa.float64()),
        ("top1", pa.float64()),  # base model trained on these labels; null until known
    ]
)


def transfer_schema(methods: list[str]) -> pa.Schema:
    """Targets x methods: top-1 per (target, method), and the best method of each row."""
    return pa.schema(
        [("target", pa.string())] + [(m, pa.float64()) for m in methods] + [("best", pa.string())]
    )


# Top-K selection (cvpipe/selection.py).

# A persisted partial top-K per class (a map-side result or a merge): the candidates
# kept so far, located by predictions file and row; top_p, top_k, per-class candidate
# counts and the covered predictions files are in the lineage.
TOPK_STATE = pa.schema(
    [
        ("label", pa.int32()),
        ("score", pa.float32()),
        ("file", pa.string()),  # predictions URL holding the row
        ("row", pa.int32()),
    ]
)

# The selection report: one row per class of the teacher.
SELECTION_REPORT = pa.schema(
    [
        ("label", pa.int32()),
        ("class_name", pa.string()),
        ("candidates", pa.int64()),  # images whose top-P holds the class
        ("selected", pa.int64()),  # min(K, candidates)
        ("min_score", pa.float32()),  # score of the last selected image (null if none)
        ("max_score", pa.float32()),
    ]
)

# One row per (seed, K, |U| fraction, method) of the semi-supervised experiment: the
# main run and every point of the K and |U| sweeps (Yalniz et al. Fig. 5 and Fig. 3).
SSL_RUNS = pa.schema(
    [
        ("seed", pa.int64()),
        ("top_k", pa.int64()),
        ("unlabeled_fraction", pa.float64()),
        ("labeled", pa.int64()),  # |D|
        ("pseudo", pa.int64()),  # |D^|: pseudo-labeled samples the student saw
        ("precision", pa.float64()),  # share of D^ whose pseudo-label is right (if known)
        ("method", pa.string()),
        ("top1", pa.float64()),
        ("top5", pa.float64()),
    ]
)

# Samples of one shard and how many carry their true label (cvpipe/label/materialize.py
# LabelCheckStage): one row per shard, summed by the flow into counts and precision.
LABEL_CHECK = pa.schema(
    [
        ("shard", pa.string()),
        ("samples", pa.int64()),
        ("checked", pa.int64()),  # samples with a known true label
        ("right", pa.int64()),  # ... whose label is that true label
    ]
)


# Training metrics of any task (cvpipe/learn/loop.py): one row per epoch and split, the
# task's metrics between the loss and the throughput. Classification's is METRICS.
def metrics_schema(metric_names: tuple[str, ...] | list[str]) -> pa.Schema:
    return pa.schema(
        [("epoch", pa.int32()), ("split", pa.string()), ("loss", pa.float64())]
        + [(name, pa.float64()) for name in metric_names]
        + [("images_per_s", pa.float64())]
    )


# Features (cvpipe/data/features.py): the keys of one features file, row i <-> row i of
# the float32 matrix in the .npy beside it; dim, dtype and rows in the schema metadata.
FEATURES = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
    ]
)

# Uniform's counting pass (cvpipe/label/anchor_stages.py): images per Nearest-3 sequence
# of one features file, merged into the rule (UNIFORM_RULE).
SEQUENCE_COUNTS = pa.schema(
    [
        ("sequence", pa.string()),  # anchor names joined with ">", closest first
        ("count", pa.int64()),
    ]
)

# Ingest hardening (cvpipe/data/plan.py, cvpipe/data/integrity.py).

# What a folder walk did not list, and why (hidden, not an image suffix): one row per
# file or folder, next to the partition's plan.
SKIPPED_FILES = pa.schema(
    [
        ("path", pa.string()),  # relative to the source folder
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)

# One row per shard checked before a stage reads it: readable, complete, as ingested.
SHARD_CHECKS = pa.schema(
    [
        ("shard", pa.string()),
        ("url", pa.string()),
        ("ok", pa.bool_()),
        ("reason", pa.string()),  # "" when ok, else e.g. corrupt_tar, checksum_mismatch
        ("detail", pa.string()),
        ("samples", pa.int64()),  # samples read from the tar
        ("expected", pa.int64()),  # rows of its ingest index (-1 when it has none)
    ]
)

# The FAISS index of embeddings (cvpipe/index/).

# The id map of one added part of an index: FAISS row id -> the sample it holds.
INDEX_IDS = pa.schema(
    [
        ("id", pa.int64()),
        ("key", pa.string()),
        ("shard", pa.string()),
        ("partition", pa.string()),
    ]
)

# Nearest neighbours of every queried vector: nearest first, the query itself excluded.
NEIGHBORS = pa.schema(
    [
        ("key", pa.string()),
        ("neighbors", pa.list_(pa.string())),
        ("distances", pa.list_(pa.float32())),
    ]
)

# Near-duplicates: a key whose neighbour ``duplicate_of`` (added to the index before it)
# lies closer than the threshold; selection and materialize can exclude these keys.
DUPLICATES = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("duplicate_of", pa.string()),
        ("distance", pa.float32()),
    ]
)

# Retrieval evaluation: one row per (features, k, seed); recall of the approximate index
# against exact search, and precision@k by label (neighbours that share the query's label).
RETRIEVAL = pa.schema(
    [
        ("features", pa.string()),  # siamese | teacher | random
        ("seed", pa.int64()),
        ("k", pa.int32()),
        ("queries", pa.int64()),
        ("index_kind", pa.string()),
        ("recall", pa.float64()),  # approximate vs exact k nearest (intersection)
        ("precision", pa.float64()),  # share of the k neighbours with the query's label
        ("exact_precision", pa.float64()),  # the same with exact search
    ]
)

# Detection (cvpipe/learn/detect_eval.py, cvpipe/label/pseudo_boxes.py).

# COCO-style scores of one detector on one labeled split (torchmetrics'
# MeanAveragePrecision): mAP@[.5:.95], mAP@.5, mAP@.75, mean recall at 100 detections.
DETECT_METRICS = pa.schema(
    [
        ("split", pa.string()),
        ("images", pa.int64()),
        ("boxes", pa.int64()),  # ground-truth boxes scored against
        ("map", pa.float64()),
        ("map_50", pa.float64()),
        ("map_75", pa.float64()),
        ("mar_100", pa.float64()),
        ("images_per_s", pa.float64()),
    ]
)

# Per-class AP of a detector (NaN where the split holds no box of the class).
DETECT_PER_CLASS = pa.schema(
    [
        ("class_index", pa.int32()),
        ("class_name", pa.string()),
        ("boxes", pa.int64()),  # ground-truth boxes of the class
        ("ap", pa.float64()),  # AP@[.5:.95]
        ("ap_50", pa.float64()),
    ]
)

# Pseudo-boxes: a detector's boxes above a score threshold after NMS, per sample;
# ``labels`` index the detector's classes (0-based; the class names are in the lineage).
PSEUDO_BOXES = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("boxes", pa.list_(pa.list_(pa.float32()))),  # [x1, y1, x2, y2] in image pixels
        ("labels", pa.list_(pa.int32())),
        ("scores", pa.list_(pa.float32())),
    ]
)

# Object localization (one box per image): top-1 and IoU of the predicted box.
LOCALIZE_METRICS = pa.schema(
    [
        ("split", pa.string()),
        ("images", pa.int64()),
        ("top1", pa.float64()),
        ("mean_iou", pa.float64()),
        ("iou_50", pa.float64()),  # share of images whose box has IoU >= 0.5
        ("correct_50", pa.float64()),  # right class and IoU >= 0.5
    ]
)

# The detection teacher-student study: one row per (seed, method).
DETECT_STUDY = pa.schema(
    [
        ("seed", pa.int64()),
        ("method", pa.string()),  # teacher | supervised | student_pretrained | student_finetuned
        ("labeled", pa.int64()),
        ("pseudo_images", pa.int64()),
        ("pseudo_boxes", pa.int64()),
        ("map", pa.float64()),
        ("map_50", pa.float64()),
    ]
)

# Weak supervision from captions and hashtags (cvpipe/label/vocab.py, targets.py).

# A map-side partial of the vocabulary (one shard, or a merge of partials): words
# sorted ascending, with occurrences and the number of samples holding the word. The
# error bound of a cut partial (see vocab.py) is in the lineage.
VOCAB_COUNTS = pa.schema(
    [
        ("word", pa.string()),
        ("count", pa.int64()),
        ("images", pa.int64()),
    ]
)

# The vocabulary: the V most frequent words (count >= min count), ties by word;
# ``index`` is the word's output unit of a weakly supervised model (0 = most frequent).
VOCAB = pa.schema(
    [
        ("word", pa.string()),
        ("count", pa.int64()),
        ("images", pa.int64()),
        ("index", pa.int32()),
    ]
)

# Per sample, its distinct in-vocabulary words (vocabulary indices, ascending): the
# target is 1/k on each of its k words. ``weight`` is its resampling weight (1.0
# without resampling). Samples with no in-vocabulary word have no row.
WORD_TARGETS = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("words", pa.list_(pa.int32())),
        ("weight", pa.float32()),
    ]
)

# Word prediction scored on held-out captioned samples: precision@k of a model and of
# the frequency baseline (always the k most frequent words), in one table.
WORD_PRECISION = pa.schema(
    [
        ("method", pa.string()),
        ("images", pa.int64()),
        ("p_at_1", pa.float64()),
        ("p_at_5", pa.float64()),
        ("p_at_10", pa.float64()),
    ]
)

# The best-scoring held-out samples of some words (a word's output unit, softmax score).
WORD_TOP_IMAGES = pa.schema(
    [
        ("word", pa.string()),
        ("rank", pa.int32()),
        ("key", pa.string()),
        ("shard", pa.string()),
        ("score", pa.float32()),
    ]
)


# Learning to transfer (cvpipe/label/p2l.py, cvpipe/learn/shallow.py,
# cvpipe/models/costs.py, cvpipe/experiments/p2l_validation.py, transfer_study.py).

# A P2L-style ranking of candidate sources for one target: best first (rank 1).
P2L_RANKING = pa.schema(
    [
        ("candidate", pa.string()),
        ("size", pa.int64()),  # images of the source dataset
        ("divergence", pa.float64()),  # D(target, source); see cvpipe/label/p2l.py
        ("score", pa.float64()),  # w_size * log(size) - w_div * divergence
        ("rank", pa.int32()),
        ("checkpoint", pa.string()),  # the candidate's source model, when given
    ]
)

# Fitted P2L weights (one row); the transfer results they came from are in the lineage.
P2L_WEIGHTS = pa.schema(
    [
        ("w_size", pa.float64()),
        ("w_div", pa.float64()),
        ("metric", pa.string()),  # kl | cosine | l2
        ("kind", pa.string()),  # the summaries' vector kind (anchors: mean | normalized | softmax)
        ("kl_direction", pa.string()),
        ("eps", pa.float64()),
        ("targets", pa.int64()),
        ("points", pa.int64()),
        ("r2", pa.float64()),
    ]
)

# A shallow learner on frozen features (cvpipe shallow): one row per fitted model.
SHALLOW = pa.schema(
    [
        ("model", pa.string()),  # svm | logistic
        ("top1", pa.float64()),  # test accuracy in [0, 1]
        ("train", pa.int64()),  # labeled training vectors used
        ("test", pa.int64()),  # labeled test vectors scored
        ("classes", pa.int64()),
        ("per_class", pa.int64()),  # labels kept per class (null: all)
        ("c", pa.float64()),  # inverse regularization strength
        ("unlabeled", pa.int64()),  # vectors whose key had no label in the truth index
        ("fit_seconds", pa.float64()),
    ]
)

# The footprint and speed of one model on one device (cvpipe/models/costs.py).
MODEL_COSTS = pa.schema(
    [
        ("model", pa.string()),
        ("arch", pa.string()),
        ("input_size", pa.int32()),
        ("params", pa.int64()),
        ("checkpoint_bytes", pa.int64()),
        ("peak_memory_mb", pa.float64()),
        ("memory_kind", pa.string()),  # cuda_allocated | process_rss
        ("latency_ms_b1", pa.float64()),  # per image at batch 1 (median)
        ("batch", pa.int32()),
        ("latency_ms_batched", pa.float64()),  # per image at `batch` (median)
        ("device", pa.string()),
        ("threads", pa.int32()),
    ]
)

# One row per (target, source, seed) of an exhaustive transfer grid: the ground truth
# of the P2L validation.
TRANSFER_GRID = pa.schema(
    [
        ("target", pa.string()),
        ("source", pa.string()),
        ("seed", pa.int64()),
        ("size", pa.int64()),
        ("divergence", pa.float64()),
        ("val_top1", pa.float64()),
        ("test_top1", pa.float64()),
    ]
)

# The P2L validation: one row per selector (p2l, largest, closest, paper figures).
P2L_VALIDATION = pa.schema(
    [
        ("selector", pa.string()),
        ("targets", pa.int64()),
        ("best_picked", pa.int64()),  # targets where the pick is the best source
        ("best_rate", pa.float64()),
        ("mean_loss", pa.float64()),  # mean (best - picked) test top-1 over targets
        ("max_loss", pa.float64()),
        ("spearman", pa.float64()),  # mean over targets of rank correlation with top-1
    ]
)

# Transfer methods on a target: one row per (target, labels per class, method, seed).
TRANSFER_METHODS = pa.schema(
    [
        ("target", pa.string()),
        ("per_class", pa.int64()),  # labeled images per class (null: all)
        ("source", pa.string()),
        ("method", pa.string()),  # svm, logistic, freeze-N, lr-mult, curriculum:...
        ("freeze", pa.int32()),  # backbone stages frozen (null: not a fine-tune)
        ("seed", pa.int64()),
        ("val_top1", pa.float64()),
        ("test_top1", pa.float64()),
        ("train_seconds", pa.float64()),
    ]
)
