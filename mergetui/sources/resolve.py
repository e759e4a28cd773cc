"""Resolve model references to something the engine can open: a local folder, or (for checks that
must not download weights) a header-only view of a Hub model.

Hub work is done by :mod:`mergetui.sources.hub` (huggingface_hub underneath: ``HF_HOME``,
``HF_ENDPOINT``, ``HF_HUB_OFFLINE`` and the user's token are honoured, the token never read here).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mergetui.errors import SourceError
from mergetui.sources import hub
from mergetui.sources.checkpoint import Checkpoint, open_checkpoint
from mergetui.sources.refs import ModelRef

DownloadCallback = Callable[["hub.DownloadProgress"], None]


def resolve_dir(ref: ModelRef, on_download: DownloadCallback | None = None) -> Path:
    """A local folder holding the model: the path itself, or its snapshot in the HF cache
    (downloading what is missing, with progress; offline, from the cache alone)."""
    if ref.local_path is not None:
        return ref.local_path
    return hub.download(ref, on_download)


def open_model(
    ref: ModelRef, label: str, *, fetch: bool, on_download: DownloadCallback | None = None
) -> Checkpoint:
    """Open a model from its headers. With ``fetch`` off, a Hub model that is not in the cache is
    opened from its config.json and safetensors headers on the Hub (no weight is downloaded)."""
    if ref.local_path is not None or fetch:
        return open_checkpoint(resolve_dir(ref, on_download), label)
    cached = hub.cached_snapshot(ref)
    if cached is not None:
        return open_checkpoint(cached, label)
    if hub.is_offline():
        raise SourceError(
            f"{label}: model {hub.ref_name(ref)} is not in the cache and HF_HUB_OFFLINE is set; "
            f"run `mergetui hub download {hub.ref_name(ref)}` where the Hub is reachable"
        )
    return hub.remote_checkpoint(ref, label)
