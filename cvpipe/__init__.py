"""cvpipe: images in, labeled data and trained models out.

The library layer: plain Python, torch, pyarrow, faiss and fsspec. It never imports
Prefect; the orchestration lives in the sibling packages ``tasks`` and ``flows``.
"""

__version__ = "0.1.0"
