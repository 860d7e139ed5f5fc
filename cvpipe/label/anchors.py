"""Divergence-based pseudo-labeling with named anchor points (Dube et al. 2019).

``from cvpipe.label import anchors`` gives the whole public surface, from the modules
that hold it along their jobs:

- :mod:`cvpipe.label.anchor_space`: anchors as summaries in a reference model's feature
  space (vector kinds, partial sums, merge, the anchors table);
- :mod:`cvpipe.label.distances`: cosine, L2 and KL distances, the FAISS index, top-k;
- :mod:`cvpipe.label.anchor_labels`: the labelers (Nearest-N, CFA, Uniform, Random,
  Vanilla), the Uniform rule, the method tag;
- :mod:`cvpipe.label.anchor_labeling`: one features file -> one labels file, streamed;
- :mod:`cvpipe.label.anchor_stages`: the stages the flows compose.

Features are read through :mod:`cvpipe.data.features` (the one reader).
"""

from cvpipe.label.anchor_labeling import (
    AnchorRanker,
    Labeler,
    LabelStats,
    count_sequences_file,
    label_counts,
    label_file,
    label_folder,
    labels_url,
    read_truth,
)
from cvpipe.label.anchor_labels import (
    METHODS,
    Labels,
    UniformRule,
    cfa_labels,
    key_hash,
    label_stats,
    merge_counts,
    method_tag,
    nearest_labels,
    random_labels,
    read_uniform_rule,
    sequence_counts,
    uniform_labels,
    uniform_rule,
    vanilla_labels,
    write_uniform_rule,
)
from cvpipe.label.anchor_space import (
    KINDS,
    AnchorSums,
    anchor_partial,
    build_anchors,
    load_head,
    merge_anchor_files,
    merge_anchor_sums,
    read_anchor_sums,
    read_anchors,
    to_space,
    write_anchor_sums,
    write_anchors,
)
from cvpipe.label.anchor_stages import (
    AnchorMergeStage,
    AnchorSumsStage,
    LabelStage,
    UniformCountsStage,
    UniformRuleStage,
)
from cvpipe.label.distances import (
    DEFAULT_EPS,
    KL_DIRECTIONS,
    METRICS,
    AnchorIndex,
    anchor_distances,
    kl_matrix,
    rank_anchors,
    top_k,
)

__all__ = [
    "DEFAULT_EPS",
    "KINDS",
    "KL_DIRECTIONS",
    "METHODS",
    "METRICS",
    "AnchorIndex",
    "AnchorMergeStage",
    "AnchorRanker",
    "AnchorSums",
    "AnchorSumsStage",
    "LabelStage",
    "LabelStats",
    "Labeler",
    "Labels",
    "UniformCountsStage",
    "UniformRule",
    "UniformRuleStage",
    "anchor_distances",
    "anchor_partial",
    "build_anchors",
    "cfa_labels",
    "count_sequences_file",
    "key_hash",
    "kl_matrix",
    "label_counts",
    "label_file",
    "label_folder",
    "label_stats",
    "labels_url",
    "load_head",
    "merge_anchor_files",
    "merge_anchor_sums",
    "merge_counts",
    "method_tag",
    "nearest_labels",
    "random_labels",
    "rank_anchors",
    "read_anchor_sums",
    "read_anchors",
    "read_truth",
    "read_uniform_rule",
    "sequence_counts",
    "to_space",
    "top_k",
    "uniform_labels",
    "uniform_rule",
    "vanilla_labels",
    "write_anchor_sums",
    "write_anchors",
    "write_uniform_rule",
]
