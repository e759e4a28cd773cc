"""Resolve model references to local folders: local paths as they are, Hub ids via huggingface_hub.

huggingface_hub does the Hub work (cache layout, ``HF_HOME``, ``HF_ENDPOINT``, ``HF_HUB_OFFLINE``, the
user's token); mergetui never reads, prints or stores the token itself.
"""

from __future__ import annotations

from pathlib import Path

from mergetui.errors import SourceError
from mergetui.sources.refs import ModelRef

#: What a merge needs from a model repo: configs, tokenizer files and weights (safetensors first).
MODEL_FILE_PATTERNS = [
    "*.json",
    "*.safetensors",
    "tokenizer.model",
    "*.tiktoken",
    "merges.txt",
    "vocab.txt",
    "*.jinja",
]
BIN_FILE_PATTERNS = ["pytorch_model*.bin", "adapter_model.bin"]


def resolve_dir(ref: ModelRef) -> Path:
    """A local folder holding the model: the path itself, or the Hub snapshot in the HF cache.

    Hub models are downloaded (or found in the cache when offline) with only the files a merge needs;
    ``.bin`` weights are fetched only when the repo has no safetensors.
    """
    if ref.local_path is not None:
        return ref.local_path
    assert ref.repo_id is not None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    name = f"{ref.repo_id}@{ref.revision}" if ref.revision else ref.repo_id
    try:
        folder = Path(
            snapshot_download(
                ref.repo_id, revision=ref.revision, allow_patterns=MODEL_FILE_PATTERNS
            )
        )
        if not any(folder.glob("*.safetensors")):
            folder = Path(
                snapshot_download(
                    ref.repo_id,
                    revision=ref.revision,
                    allow_patterns=MODEL_FILE_PATTERNS + BIN_FILE_PATTERNS,
                )
            )
    except GatedRepoError as exc:
        raise SourceError(
            f"{name}: this repo is gated or private; log in with `hf auth login` or set HF_TOKEN"
        ) from exc
    except RevisionNotFoundError as exc:
        raise SourceError(f"{name}: revision {ref.revision!r} not found on the Hub") from exc
    except RepositoryNotFoundError as exc:
        raise SourceError(
            f"{name}: no such model on the Hub (or it is private: log in with "
            "`hf auth login` or set HF_TOKEN)"
        ) from exc
    except LocalEntryNotFoundError as exc:
        fetch = f"hf download {ref.repo_id}" + (
            f" --revision {ref.revision}" if ref.revision else ""
        )
        raise SourceError(
            f"model {name} is not in the cache and the Hub cannot be reached (offline?); "
            f"run `{fetch}` where the Hub is reachable"
        ) from exc
    except OSError as exc:
        raise SourceError(f"{name}: download failed: {exc}") from exc
    return folder
