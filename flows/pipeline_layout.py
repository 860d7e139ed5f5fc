"""Every URL of a pipeline run, derived from its config alone (see flows/pipeline.py).

Folder names carry short hashes of the identity of the settings that shape their
contents (``T`` teacher, ``S`` selection, ``P`` student, ``A`` anchors, ``L`` labeling,
``C`` canvases, ``D`` detector, ``E`` embedding net, ``I`` index, ``W`` vocabulary and
word targets), so changed settings never reuse stale work.
"""

from __future__ import annotations

from cvpipe.core import storage, tables
from flows.pipeline_config import PipelineConfig


def _id(*parts: object) -> str:
    return tables.config_hash(list(parts))[:8]


class Layout:
    """Every URL of a pipeline run, derived from its config alone."""

    def __init__(self, config: PipelineConfig) -> None:
        c = self.config = config
        self.root = c.root
        self.teacher_id = _id(c.teacher.train, c.teacher.init)
        self.select_id = _id(c.infer.top_p, c.select.top_k)
        self.student_id = _id(c.student.train, c.finetune.train)
        a = c.anchors
        self.anchors_id = _id(a.groups, a.sources, a.kind)
        self.labeling_id = _id(a.method, a.metric, a.n)
        self.canvases_id = _id(c.detect.canvases)
        self.detector_id = _id(c.detect.train)
        # "selection": the net's labels come from the selection table, not D^'s copies.
        self.embedding_id = _id(c.siamese.train, c.siamese.dim, c.siamese.margin, "selection")
        self.index_id = _id(c.index.kind, c.index.memory)
        w = c.weak
        self.weak_id = _id(w.size, w.min_count, w.synonyms, w.resample)

    def join(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    def shards(self, partition: str) -> str:
        return self.join("shards", partition)

    @property
    def weak_dir(self) -> str:
        return self.join("weak", f"words-{self.weak_id}")

    def vocab_url(self, partition: str) -> str:
        return storage.join(self.weak_dir, "vocab", f"{partition}.parquet")

    @property
    def targets_dir(self) -> str:
        """Word targets: TARGETS/<partition>/<stem>.parquet."""
        return storage.join(self.weak_dir, "targets")

    @property
    def ts(self) -> str:
        return f"{self.teacher_id}-{self.select_id}"

    @property
    def teacher_dir(self) -> str:
        return self.join("models", f"teacher-{self.teacher_id}")

    @property
    def infer_dir(self) -> str:
        return self.join("infer", f"teacher-{self.teacher_id}")

    @property
    def anchors_url(self) -> str:
        return self.join(
            "anchors", f"teacher-{self.teacher_id}-{self.anchors_id}", "anchors.parquet"
        )

    @property
    def labels_dir(self) -> str:
        return self.join(
            "labels", f"teacher-{self.teacher_id}-{self.anchors_id}-{self.labeling_id}"
        )

    @property
    def select_dir(self) -> str:
        return self.join("select", f"teacher-{self.ts}")

    @property
    def pseudo_dir(self) -> str:
        return self.join("pseudo", f"teacher-{self.ts}")

    @property
    def student_dir(self) -> str:
        return self.join("models", f"student-{self.ts}-{self.student_id}")

    @property
    def finetuned_dir(self) -> str:
        return self.join("models", f"finetuned-{self.ts}-{self.student_id}")

    @property
    def canvases_dir(self) -> str:
        return self.join(f"canvases-{self.canvases_id}")

    @property
    def detector_dir(self) -> str:
        return self.join("models", f"detector-{self.ts}-{self.student_id}-{self.canvases_id}"
                         f"-{self.detector_id}")  # fmt: skip

    @property
    def siamese_dir(self) -> str:
        return self.join("models", f"siamese-{self.ts}-{self.embedding_id}")

    @property
    def embed_dir(self) -> str:
        return self.join("embed", f"siamese-{self.ts}-{self.embedding_id}")

    @property
    def index_dir(self) -> str:
        return self.join("index", f"siamese-{self.ts}-{self.embedding_id}-{self.index_id}")

    @property
    def retrieval_dir(self) -> str:
        return self.join("retrieval", f"siamese-{self.ts}-{self.embedding_id}-{self.index_id}")

    def report(self, partition: str) -> str:
        return self.join("reports", f"{partition}.md")
