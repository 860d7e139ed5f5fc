"""Checks a command runs before its flow: cheap, bounded, one error line each.

Bad input found after the flow has started costs a Prefect API, task runs, retries and
pages of logs; found here, it costs seconds and one line naming the flag, the value and
the fix. What is checked:

- inputs (a source, shards, predictions ...): exist and are not empty;
- checkpoints: exist, are files torch.save wrote, and their sidecar (and, on local
  disk, their weights) load;
- the device exists (``cuda`` with a GPU torch can see, ``cuda:N`` within the count);
- outputs: the nearest existing folder is writable (a probe file is written and
  removed), no file is in the way;
- every ``s3://`` bucket named answers with the credentials given: one request with
  short connect and read timeouts and no retries, so a dead endpoint fails in seconds.

A check that fails raises :class:`PreflightError` (a PermanentError: never retried).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from cvpipe.core.stage import PermanentError

# Field names of the config models, by what their value is.
INPUT_FIELDS = (
    "source",
    "shards",
    "predictions",
    "selection",
    "features",
    "anchors",
    "sources",
    "labels",
    "truth",
)
CHECKPOINT_FIELDS = ("checkpoint",)
OUTPUT_FIELDS = ("root", "out", "work")
DEVICE_FIELDS = ("device",)

S3_CONNECT_TIMEOUT_S = 3.0
S3_READ_TIMEOUT_S = 5.0
# Inputs given as long lists are checked at their ends (the flow lists them all anyway).
CHECK_AT_MOST = 16


class PreflightError(PermanentError):
    """A value that cannot work: ``FLAG VALUE: problem; fix``."""

    def __init__(self, flag: str, value: Any, problem: str, fix: str) -> None:
        shown = value if isinstance(value, str) else repr(value)
        super().__init__(f"{flag} {shown}: {problem}; {fix}")
        self.flag, self.value, self.problem, self.fix = flag, value, problem, fix


@dataclass
class Checks:
    """What a command's values are, each under the flag that gave it."""

    inputs: dict[str, Any] = field(default_factory=dict)
    checkpoints: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    devices: dict[str, str] = field(default_factory=dict)

    def add(self, kind: str, flag: str, value: Any) -> None:
        if value is None or value == "" or value == [] or value == {}:
            return
        getattr(self, kind)[flag] = value


def for_config(config: BaseModel, flag_of: Mapping[str, str] | None = None) -> Checks:
    """The checks of a config model's fields, found by field name; ``flag_of`` maps a
    field to the flag a person typed (default ``--field-name``)."""
    checks = Checks()
    names = type(config).model_fields
    for kinds, fields in (
        ("inputs", INPUT_FIELDS),
        ("checkpoints", CHECKPOINT_FIELDS),
        ("outputs", OUTPUT_FIELDS),
        ("devices", DEVICE_FIELDS),
    ):
        for name in fields:
            if name in names:
                value = getattr(config, name)
                if isinstance(value, (str, list, tuple, dict)):  # not a flag like --features
                    flag = (flag_of or {}).get(name) or "--" + name.replace("_", "-")
                    checks.add(kinds, flag, value)
    return checks


def run(checks: Checks) -> None:
    """Every check: the S3 endpoints first (the others would hang on a dead one), then
    those that need no torch, then those that import it (seconds)."""
    _check_s3(checks)
    for flag, value in checks.inputs.items():
        check_input(flag, value)
    for flag, url in checks.outputs.items():
        check_output(flag, url)
    for flag, url in checks.checkpoints.items():
        check_checkpoint_files(flag, url)
    for flag, value in checks.devices.items():
        check_device(flag, value)
    for flag, url in checks.checkpoints.items():
        check_checkpoint(flag, url)


# ------------------------------------------------------------------------ values


def _urls(value: Any) -> list[str]:
    """The URLs of an input value: a string, a list of them, or NAME -> either."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        return [u for v in value.values() for u in _urls(v)]
    if isinstance(value, Iterable):
        items = [u for v in value for u in _urls(v)]
        if len(items) > CHECK_AT_MOST:
            half = CHECK_AT_MOST // 2
            items = items[:half] + items[-half:]
        return items
    return []


def check_input(flag: str, value: Any) -> None:
    from cvpipe.core import storage

    for url in _urls(value):
        if "{" in url:  # a brace pattern: its first and last files
            import braceexpand

            names = list(braceexpand.braceexpand(url))
            for u in dict.fromkeys((names[0], names[-1])):
                if not storage.is_committed(u):
                    raise PreflightError(
                        flag, url, f"{u} does not exist", "check the pattern's range"
                    )
            continue
        fs, path = storage.url_to_fs(url)
        if not fs.exists(path):
            raise PreflightError(
                flag, url, "does not exist", "give an existing file, folder or prefix"
            )
        if fs.isdir(path):
            if not fs.ls(path, detail=False):
                raise PreflightError(
                    flag, url, "is an empty folder", "give the folder that holds the files"
                )
        elif fs.size(path) == 0:
            raise PreflightError(flag, url, "is an empty file", "give a file with content")


# torch.save's first bytes (cvpipe.models.checkpoints.check_magic says the same once
# torch is imported; this copy lets a wrong file fail before torch's seconds of import).
TORCH_FILE_MAGIC = (b"PK\x03\x04", b"\x80")
CHECKPOINT_FIX = "give a .pt written by cvpipe train, its .json sidecar beside it"


def check_checkpoint_files(flag: str, url: str) -> None:
    """Without torch: the file exists, starts as torch.save's files do, and its sidecar
    is JSON."""
    import json

    from cvpipe.core import storage

    fs, path = storage.url_to_fs(url)
    if fs.isdir(path):
        raise PreflightError(flag, url, "is a folder", "give the .pt file inside it")
    if not storage.is_committed(url):
        raise PreflightError(flag, url, "does not exist", CHECKPOINT_FIX)
    with fs.open(path, "rb") as f:
        head = f.read(16)
    if not head.startswith(TORCH_FILE_MAGIC):
        raise PreflightError(
            flag, url, f"is not a checkpoint (it starts with {head!r})", CHECKPOINT_FIX
        )
    sidecar = url.removesuffix(".pt") + ".json"  # checkpoints.sidecar_url, without torch
    if not storage.is_committed(sidecar):
        raise PreflightError(flag, url, f"its sidecar {sidecar} is missing", CHECKPOINT_FIX)
    try:
        json.loads(storage.read_bytes(sidecar))
    except ValueError:
        problem = f"its sidecar {sidecar} is not JSON"
        raise PreflightError(flag, url, problem, CHECKPOINT_FIX) from None


def check_checkpoint(flag: str, url: str) -> None:
    """With torch: the sidecar describes a model and (on local disk; remote weights are
    read once, by the flow) the weights load with ``weights_only=True``."""
    from cvpipe.core import storage
    from cvpipe.models import checkpoints

    fs, _ = storage.url_to_fs(url)
    try:
        checkpoints.load_info(url)
        if storage.is_local(fs):
            checkpoints.load_state(url)
    except checkpoints.CheckpointError as e:
        problem = str(e).replace(f"checkpoint {url} ", "").replace(f"{url} ", "")
        raise PreflightError(flag, url, problem, CHECKPOINT_FIX) from None


def check_device(flag: str, device: str) -> None:
    if device in ("auto", "cpu"):
        return
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise PreflightError(
                flag, device, "torch sees no CUDA device", "use --device cpu (or auto)"
            )
        index = device.partition(":")[2]
        count = torch.cuda.device_count()
        if index and (not index.isdigit() or int(index) >= count):
            raise PreflightError(
                flag,
                device,
                f"this machine has {count} CUDA device(s)",
                f"use cuda:0 .. cuda:{count - 1}",
            )
        return
    try:
        torch.device(device)
    except (RuntimeError, ValueError):
        raise PreflightError(
            flag, device, "is not a device", "use auto, cpu, cuda or cuda:N"
        ) from None
    if device == "mps" and not torch.backends.mps.is_available():
        raise PreflightError(flag, device, "torch sees no MPS device", "use --device cpu")


def check_output(flag: str, url: str) -> None:
    """The folder ``url`` is (or will be created in) takes a file; local disk only (an S3
    bucket is checked with its endpoint)."""
    from cvpipe.core import storage

    fs, path = storage.url_to_fs(url)
    if not storage.is_local(fs):
        return
    path = os.path.abspath(path)
    if os.path.isfile(path):
        if not os.path.splitext(path)[1]:  # a name without a suffix names a folder
            raise PreflightError(flag, url, "is a file, not a folder", "choose another path")
        folder = os.path.dirname(path)
    else:
        folder = path
        while not os.path.exists(folder):
            folder = os.path.dirname(folder)
        if not os.path.isdir(folder):
            raise PreflightError(
                flag, url, f"cannot be created: {folder} is a file", "choose another path"
            )
    try:
        fd, name = tempfile.mkstemp(prefix=".cvpipe-write-probe-", dir=folder)
        os.close(fd)
        os.remove(name)
    except OSError as e:
        raise PreflightError(
            flag,
            url,
            f"is not writable ({folder}: {e.strerror})",
            "choose a folder you can write to",
        ) from None


# ---------------------------------------------------------------------------- S3


def _s3_urls(checks: Checks) -> dict[str, tuple[str, str]]:
    """bucket -> (flag, url) of the first value naming it."""
    out: dict[str, tuple[str, str]] = {}
    values: list[tuple[str, Any]] = [
        *checks.inputs.items(),
        *checks.checkpoints.items(),
        *checks.outputs.items(),
    ]
    for flag, value in values:
        for url in _urls(value):
            if url.startswith("s3://"):
                bucket = url[len("s3://") :].split("/", 1)[0]
                out.setdefault(bucket, (flag, url))
    return out


def _s3_client() -> Any:
    import botocore.session
    from botocore.config import Config

    session = botocore.session.get_session()
    config = Config(
        connect_timeout=S3_CONNECT_TIMEOUT_S,
        read_timeout=S3_READ_TIMEOUT_S,
        retries={"total_max_attempts": 1, "mode": "standard"},
    )
    return session, session.create_client("s3", config=config)


def _check_s3(checks: Checks) -> None:
    buckets = _s3_urls(checks)
    if not buckets:
        return
    from botocore import exceptions as bx

    session, client = _s3_client()
    endpoint = client.meta.endpoint_url
    for bucket, (flag, url) in buckets.items():
        if session.get_credentials() is None:
            raise PreflightError(
                flag,
                url,
                "no S3 credentials were found",
                "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)",
            )
        try:
            client.head_bucket(Bucket=bucket)
        except (
            bx.EndpointConnectionError,
            bx.ConnectTimeoutError,
            bx.ReadTimeoutError,
            bx.ConnectionClosedError,
        ) as e:
            raise PreflightError(
                flag,
                url,
                f"the S3 endpoint {endpoint} does not answer ({type(e).__name__})",
                "check AWS_ENDPOINT_URL and that the service is up",
            ) from None
        except bx.ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchBucket"):
                raise PreflightError(
                    flag,
                    url,
                    f"bucket {bucket} does not exist at {endpoint}",
                    "create it, or check the URL",
                ) from None
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise PreflightError(
                    flag,
                    url,
                    f"{endpoint} refused the credentials ({code})",
                    "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)",
                ) from None
            raise PreflightError(
                flag, url, f"{endpoint} answered {code}: {e}", "check the bucket and credentials"
            ) from None
        except bx.BotoCoreError as e:
            raise PreflightError(
                flag, url, f"S3 check failed: {e}", "check AWS_ENDPOINT_URL and the credentials"
            ) from None


def flags_of(spec: Any) -> dict[str, str]:
    """field -> the flag (or ARGUMENT) a generated command shows for it."""
    from flows.cli_models import cli_fields

    out = {}
    for name in cli_fields(spec):
        out[name] = name.upper() if name in spec.positional else spec.flags(name)[0].split("/")[0]
    return out
