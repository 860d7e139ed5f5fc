"""The anchor stages (the :mod:`cvpipe.core.stage` protocol), one features file a unit.

Building anchors (``cvpipe anchors build``) and labeling with them (``cvpipe label``)
are multi-phase; a flow composes these stages, each phase handing the next URLs:

- :class:`AnchorSumsStage`: one features file of one anchor dataset -> its partial sums
  (``{work}/partials/{anchor}/{partition}/{stem}.parquet``, ANCHOR_SUMS);
- :class:`AnchorMergeStage`: one unit, every partial -> the anchors table (``out``);
- :class:`UniformCountsStage`: Uniform's counting pass, one features file -> its
  Nearest-3 sequence histogram (``OUT/_uniform_rule_parts/{partition}/{stem}.parquet``);
- :class:`UniformRuleStage`: one unit, every histogram -> the frozen rule
  (``OUT/_uniform_rule.parquet``);
- :class:`LabelStage`: one features file -> its labels (``OUT/{partition}/{stem}.parquet``).

Each output records the identity of the stage that wrote it (the config fields that
change it, see :meth:`AnchorStage.identity`); a committed output is skipped only when
that identity matches, so a rerun with another method, metric or kind into the same
folder redoes the work instead of returning stale labels.
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import pyarrow as pa
from pydantic import BaseModel

from cvpipe.core import storage, tables
from cvpipe.core.config import identity
from cvpipe.core.stage import PermanentError, Resources, Stage, Unit
from cvpipe.data.features import features_urls
from cvpipe.data.shards import shard_id, unit_url
from cvpipe.label.anchor_labeling import (
    AnchorRanker,
    Labeler,
    LabelStats,
    count_sequences_file,
    label_counts,
    labels_url,
)
from cvpipe.label.anchor_labels import (
    label_stats,
    merge_counts,
    read_uniform_rule,
    write_uniform_rule,
)
from cvpipe.label.anchor_space import (
    anchor_partial,
    merge_anchor_files,
    read_anchor_sums,
    read_anchors,
    write_anchor_sums,
    write_anchors,
)
from cvpipe.label.config import AnchorsConfig, LabelConfig

C = TypeVar("C", bound=BaseModel)
S = TypeVar("S")

IDENTITY_KEY = "stage_identity"


class AnchorStage(Stage[C, S]):
    """A stage whose outputs record its identity; committed means committed by a stage
    of the same identity. ``fields`` names the config fields a unit's output depends on
    (None: all of the config's identity)."""

    fields: ClassVar[tuple[str, ...] | None] = None

    def identity(self) -> dict[str, Any]:
        full = identity(self.config)
        keep = full if self.fields is None else {k: full[k] for k in self.fields if k in full}
        return {"stage": self.name, "version": self.version, **keep}

    def stamp(self) -> dict[str, str]:
        """Lineage fields every output of this stage carries."""
        return {IDENTITY_KEY: self.identity_hash()}

    def committed(self, unit: Unit) -> bool:
        outs = self.outputs(unit)
        if not all(storage.is_committed(u) for u in outs):
            return False
        return tables.read_lineage(outs[-1]).get(IDENTITY_KEY) == self.identity_hash()

    def ensure_setup(self) -> None:
        try:
            super().ensure_setup()
        except (ValueError, FileNotFoundError) as e:  # a bad config: no retry fixes it
            raise PermanentError(f"{self.name}: {e}") from e


def _features_units(spec: str | Sequence[str]) -> list[Unit]:
    """One unit per committed features file, named by its shard id."""
    return [Unit(shard_id(u), (u,)) for u in features_urls(spec)]


# ----------------------------------------------------------------------------- anchors


def anchors_work_dir(config: AnchorsConfig) -> str:
    """Where the anchors' features and partial sums go: ``work``, or ``<out stem>_work``
    beside ``out``."""
    if config.work:
        return config.work
    parent = posixpath.dirname(config.out.rstrip("/")) or "."
    stem = posixpath.basename(config.out).rsplit(".", 1)[0]
    return storage.join(parent, f"{stem}_work")


def anchor_features_dir(config: AnchorsConfig, anchor: str) -> str:
    """The inference output folder of one anchor dataset (features under ``features/``)."""
    return storage.join(anchors_work_dir(config), "features", anchor)


@dataclass(frozen=True)
class SumsStats:
    anchor: str
    out: str
    images: int
    skipped: bool


class AnchorSumsStage(AnchorStage[AnchorsConfig, SumsStats]):
    """Unit: one features file of one anchor dataset -> its partial sums."""

    name = "anchor-sums"
    resources = Resources(cpus=1)
    fields = ("checkpoint", "kind")

    def units(self) -> list[Unit]:
        c = self.config
        return [
            Unit(f"{name}/{u.name}", u.inputs, extra=(("anchor", name),))
            for name in sorted(c.sources)
            for u in _features_units(storage.join(anchor_features_dir(c, name), "features"))
        ]

    def outputs(self, unit: Unit) -> list[str]:
        work = anchors_work_dir(self.config)
        return [unit_url(work, f"partials/{unit.get('anchor')}", shard_id(unit.inputs[0]))]

    def process(self, unit: Unit) -> SumsStats:
        c, anchor = self.config, unit.get("anchor")
        sums = anchor_partial(unit.inputs[0], anchor, c.kind, c.checkpoint)
        out = self.outputs(unit)[0]
        write_anchor_sums(sums, out, {"features": unit.inputs[0], "anchor": anchor,
                                      **self.stamp()})  # fmt: skip
        return SumsStats(anchor, out, sums.counts[anchor], skipped=False)

    def read_back(self, unit: Unit) -> SumsStats:
        out = self.outputs(unit)[0]
        anchor = unit.get("anchor")
        return SumsStats(anchor, out, read_anchor_sums(out).counts[anchor], skipped=True)


@dataclass(frozen=True)
class MergeStats:
    out: str
    counts: dict[str, int]  # images per anchor, by name
    skipped: bool


class AnchorMergeStage(AnchorStage[AnchorsConfig, MergeStats]):
    """One unit: every partial of :class:`AnchorSumsStage` -> the anchors table, read
    one partial at a time (memory: one anchor matrix)."""

    name = "anchor-merge"
    resources = Resources(cpus=1)

    def units(self) -> list[Unit]:
        return [Unit(posixpath.basename(self.config.out))]

    def outputs(self, unit: Unit) -> list[str]:
        return [self.config.out]

    def process(self, unit: Unit) -> MergeStats:
        from cvpipe.models import model_id

        c = self.config
        sums_stage = AnchorSumsStage(c)
        parts = (sums_stage.outputs(u)[0] for u in sums_stage.units())
        lineage = {
            "model_id": model_id(c.checkpoint),
            "checkpoint": c.checkpoint,
            "kind": c.kind,
            "sources": c.sources,
            **self.stamp(),
        }
        write_anchors(merge_anchor_files(parts), c.out, lineage)
        return self._stats(skipped=False)

    def read_back(self, unit: Unit) -> MergeStats:
        return self._stats(skipped=True)

    def _stats(self, skipped: bool) -> MergeStats:
        names, _, counts = read_anchors(self.config.out)
        return MergeStats(self.config.out, dict(zip(names, counts.tolist(), strict=True)), skipped)


# ----------------------------------------------------------------------------- uniform

RULE_NAME = "_uniform_rule"


def rule_url(config: LabelConfig) -> str:
    return storage.join(config.out, f"{RULE_NAME}.parquet")


# Fields that change which anchors are closest to an image.
RANKING_FIELDS = ("anchors", "metric", "kl_direction", "eps", "checkpoint")


@dataclass(frozen=True)
class CountStats:
    out: str
    images: int
    sequences: int
    skipped: bool


class UniformCountsStage(AnchorStage[LabelConfig, CountStats]):
    """Uniform's counting pass. Unit: one features file -> images per Nearest-3 sequence."""

    name = "uniform-counts"
    resources = Resources(cpus=1)
    fields = RANKING_FIELDS

    def units(self) -> list[Unit]:
        return _features_units(self.config.features)

    def outputs(self, unit: Unit) -> list[str]:
        return [unit_url(self.config.out, f"{RULE_NAME}_parts", shard_id(unit.inputs[0]))]

    def setup(self) -> None:
        c = self.config
        self.ranker = AnchorRanker(c.anchors, c.metric, c.kl_direction, c.eps, c.checkpoint)

    def process(self, unit: Unit) -> CountStats:
        counts = count_sequences_file(unit.inputs[0], self.ranker)
        out = self.outputs(unit)[0]
        table = pa.table(
            {"sequence": list(counts), "count": list(counts.values())},
            schema=tables.SEQUENCE_COUNTS,
        )
        lineage = tables.lineage(stage=self.name, features=unit.inputs[0], **self.stamp())
        tables.write_parquet(table, out, lineage)
        return CountStats(out, sum(counts.values()), len(counts), skipped=False)

    def read_back(self, unit: Unit) -> CountStats:
        out = self.outputs(unit)[0]
        counts = read_sequence_counts(out)
        return CountStats(out, sum(counts.values()), len(counts), skipped=True)


def read_sequence_counts(url: str) -> dict[str, int]:
    t = tables.read_parquet(url)
    return dict(zip(t.column("sequence").to_pylist(), t.column("count").to_pylist(), strict=True))


@dataclass(frozen=True)
class RuleStats:
    out: str
    buckets: int
    labels: int  # hash parts over all buckets: the labels Uniform gives
    skipped: bool


class UniformRuleStage(AnchorStage[LabelConfig, RuleStats]):
    """One unit: every histogram of :class:`UniformCountsStage` -> the frozen rule for
    ``n_labels`` labels (default: one per anchor). Memory: one histogram at a time."""

    name = "uniform-rule"
    resources = Resources(cpus=1)
    fields = (*RANKING_FIELDS, "features", "n_labels")

    def units(self) -> list[Unit]:
        return [Unit(RULE_NAME)]

    def outputs(self, unit: Unit) -> list[str]:
        return [rule_url(self.config)]

    def process(self, unit: Unit) -> RuleStats:
        c = self.config
        n_labels = c.n_labels or len(read_anchors(c.anchors)[0])  # one label per anchor
        counts_stage = UniformCountsStage(c)
        parts = (read_sequence_counts(counts_stage.outputs(u)[0]) for u in counts_stage.units())
        rule = write_uniform_rule(merge_counts(parts), n_labels, rule_url(c), self.stamp())
        return RuleStats(rule_url(c), len(rule.parts), sum(rule.parts.values()), skipped=False)

    def read_back(self, unit: Unit) -> RuleStats:
        rule = read_uniform_rule(rule_url(self.config))
        return RuleStats(rule_url(self.config), len(rule.parts), sum(rule.parts.values()), True)


# ---------------------------------------------------------------------------- labeling


class LabelStage(AnchorStage[LabelConfig, LabelStats]):
    """Unit: one features file -> its labels, by the config's method (Uniform reads the
    rule that :class:`UniformRuleStage` froze; Vanilla the shard's ingest index)."""

    name = "anchor-labels"
    resources = Resources(cpus=1)

    def units(self) -> list[Unit]:
        return _features_units(self.config.features)

    def outputs(self, unit: Unit) -> list[str]:
        return [labels_url(self.config.out, unit.inputs[0])]

    def setup(self) -> None:
        c = self.config
        if c.method == "vanilla" and not c.truth:
            raise ValueError("method vanilla needs --truth: the ingest root holding index/")
        rule = rule_url(c) if c.method == "uniform" else None
        if rule is not None and not storage.is_committed(rule):
            raise ValueError(f"method uniform: no rule at {rule} (run the counting pass first)")
        self.labeler = Labeler(
            c.anchors,
            c.method,
            n=c.n,
            metric=c.metric,
            ordered=c.ordered,
            rule_url=rule,
            n_labels=c.n_labels,
            seed=c.seed,
            kl_direction=c.kl_direction,
            eps=c.eps,
            checkpoint=c.checkpoint,
        )

    def process(self, unit: Unit) -> LabelStats:
        c, url = self.config, unit.inputs[0]
        truth = unit_url(c.truth, "index", shard_id(url)) if c.method == "vanilla" else None
        return self.labeler.label(url, self.outputs(unit)[0], truth_url=truth,
                                  lineage=self.stamp())  # fmt: skip

    def read_back(self, unit: Unit) -> LabelStats:
        out = self.outputs(unit)[0]
        counts = label_counts(out)
        return LabelStats(out, sum(counts.values()), skipped=True, counts=counts)

    def describe(self, stats: LabelStats) -> str:
        state = "already committed" if stats.skipped else "committed"
        return f"{stats.out} {state}: {stats.rows} images, {len(stats.counts)} labels"

    def summarize(self, stats: Sequence[LabelStats]) -> dict[str, Any]:
        c = self.config
        counts = merge_counts(s.counts for s in stats)
        return {"method": c.method, "metric": c.metric, "files": len(stats),
                **label_stats(counts)}  # fmt: skip
