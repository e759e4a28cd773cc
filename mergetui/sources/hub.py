"""The Hugging Face Hub (or the mirror in ``HF_ENDPOINT``): search, inspect, download, cache.

Everything goes through huggingface_hub, so the endpoint, cache layout (``HF_HOME``), offline mode
(``HF_HUB_OFFLINE``) and the user's token are handled as every other HF tool handles them; mergetui
never reads, prints, logs or stores the token. What mergetui adds:

- one error vocabulary: every failure becomes a one-line :class:`SourceError` that names the repo
  and says what to do (log in, check the revision, download where the Hub is reachable, ...);
- retries with backoff on network errors, then an error naming the endpoint in use;
- downloads of only the files a merge needs, with byte progress for the CLI and the TUI;
- safetensors headers read with ranged requests, so compatibility is checked before any weight is
  downloaded (a server that ignores ranges is read only up to the end of the header).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from mergetui.errors import SourceError
from mergetui.sources.checkpoint import SAFETENSORS_DTYPES, Checkpoint, TensorSpec
from mergetui.sources.refs import ModelRef

log = logging.getLogger(__name__)

#: Files a merge reads besides the weights: configs, tokenizer files, chat templates, the card.
SUPPORT_FILE_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "*.tiktoken",
    "merges.txt",
    "vocab.*",
    "chat_template*",
    "*.jinja",
    "preprocessor_config.json",
    "adapter_config.json",
    "README.md",
]
SAFETENSORS_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]
BIN_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json", "adapter_model.bin"]
#: Attempts for one Hub call when the network fails, and the first pause (doubled each time).
RETRIES = 4
BACKOFF_S = 0.5
_HEADER_PREFIX = 8
#: The listing fields ``hub search`` shows (the Hub sends only what is asked for).
_SEARCH_FIELDS: list[Any] = [
    "downloads",
    "lastModified",
    "pipeline_tag",
    "library_name",
    "safetensors",
    "tags",
]
_TRANSPORT_ERRORS = {"TransportError", "TimeoutException", "NetworkError", "ConnectError"}

T = TypeVar("T")


def endpoint() -> str:
    """The Hub endpoint in use (``HF_ENDPOINT`` or the default), for messages."""
    from huggingface_hub import constants

    return constants.ENDPOINT


def is_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def ref_name(ref: ModelRef) -> str:
    return f"{ref.repo_id}@{ref.revision}" if ref.revision else str(ref.repo_id)


def _download_hint(ref: ModelRef) -> str:
    suffix = f"@{ref.revision}" if ref.revision else ""
    return f"mergetui hub download {ref.repo_id}{suffix}"


@contextlib.contextmanager
def hub_errors(what: str, ref: ModelRef | None = None) -> Iterator[None]:
    """Turn huggingface_hub and network exceptions into one-line :class:`SourceError`s."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except SourceError:
        raise
    except GatedRepoError as exc:
        raise SourceError(
            f"{what}: the repo is gated or private; log in with `hf auth login` or set HF_TOKEN"
        ) from exc
    except RevisionNotFoundError as exc:
        raise _revision_missing(what, ref.revision if ref else None) from exc
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
        if ref is None:
            raise SourceError(f"{what}: not in the local cache and the Hub is unreachable") from exc
        raise SourceError(
            f"model {ref_name(ref)} is not in the cache; run `{_download_hint(ref)}` where the "
            "Hub is reachable (HF_HUB_OFFLINE is set, or the Hub cannot be reached)"
        ) from exc
    except EntryNotFoundError as exc:
        raise SourceError(f"{what}: file not found in the repo ({_first_line(exc)})") from exc
    except RepositoryNotFoundError as exc:
        raise SourceError(
            f"{what}: no such model at {endpoint()} (or it is private: log in with "
            "`hf auth login` or set HF_TOKEN)"
        ) from exc
    except HfHubHTTPError as exc:
        raise SourceError(f"{what}: the Hub at {endpoint()} answered: {_first_line(exc)}") from exc
    except OSError as exc:
        raise SourceError(f"{what}: {type(exc).__name__}: {_first_line(exc)}") from exc


def _revision_missing(what: str, revision: str | None) -> SourceError:
    return SourceError(
        f"{what}: revision {revision!r} not found; check the branch, tag or commit after '@'"
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _is_transient(exc: BaseException) -> bool:
    """Network trouble worth retrying: no connection, timeouts, 5xx and 429 answers."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(exc, OfflineModeIsEnabled):
        return False
    # huggingface_hub's HTTP client (httpx or its fork) names its network failures so:
    if any(c.__name__ in _TRANSPORT_ERRORS for c in type(exc).__mro__):
        return True
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        return exc.response.status_code >= 500 or exc.response.status_code == 429
    return isinstance(exc, (ConnectionError, TimeoutError))


def with_retries(call: Callable[[], T], what: str) -> T:
    """``call()``, retried with exponential backoff on network errors; then a one-line error
    naming the endpoint."""
    delay = BACKOFF_S
    for attempt in range(1, RETRIES + 1):
        try:
            return call()
        except Exception as exc:
            if not _is_transient(exc):
                raise
            if attempt == RETRIES:
                raise SourceError(
                    f"{what}: cannot reach the Hub at {endpoint()} after {RETRIES} tries "
                    f"({type(exc).__name__}: {_first_line(exc)}); check the network or "
                    "HF_ENDPOINT, or work offline from the cache with HF_HUB_OFFLINE=1"
                ) from exc
            log.warning("%s: %s; retrying in %.1f s", what, _first_line(exc), delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


# -- search ------------------------------------------------------------------------------------
@dataclass
class SearchHit:
    repo_id: str
    pipeline_tag: str | None
    library: str | None
    parameters: int | None
    last_modified: str | None
    downloads: int | None
    tags: list[str] = field(default_factory=list)


def search(query: str, limit: int = 20) -> list[SearchHit]:
    """Models whose id matches ``query``, most downloaded first."""
    if is_offline():
        raise SourceError(
            "hub search needs the Hub, and HF_HUB_OFFLINE is set; `mergetui hub cached` lists "
            "the models available offline"
        )
    from huggingface_hub import HfApi

    def call() -> list[Any]:
        return list(
            HfApi().list_models(search=query, limit=limit, sort="downloads", expand=_SEARCH_FIELDS)
        )

    with hub_errors(f"search {query!r}"):
        found = with_retries(call, f"search {query!r}")
    hits = []
    for model in found:
        safetensors = getattr(model, "safetensors", None)
        hits.append(
            SearchHit(
                repo_id=model.id,
                pipeline_tag=getattr(model, "pipeline_tag", None),
                library=getattr(model, "library_name", None),
                parameters=getattr(safetensors, "total", None) if safetensors else None,
                last_modified=_iso(getattr(model, "last_modified", None)),
                downloads=getattr(model, "downloads", None),
                tags=list(getattr(model, "tags", None) or []),
            )
        )
    return hits


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


# -- info ----------------------------------------------------------------------------------------
@dataclass
class RepoFile:
    path: str
    size: int | None


@dataclass
class RepoInfo:
    """What a repo holds, from its listing and its small JSON files (never its weights)."""

    repo_id: str
    revision: str
    commit: str
    files: list[RepoFile]
    config: dict[str, Any] | None
    adapter_config: dict[str, Any] | None
    last_modified: str | None = None
    private: bool | None = None
    gated: Any = None

    @property
    def weight_format(self) -> str | None:
        names = [f.path for f in self.files]
        if any(n.endswith(".safetensors") for n in names):
            return "safetensors"
        if any(n.endswith(".bin") for n in names):
            return "bin"
        return None

    @property
    def weight_files(self) -> list[RepoFile]:
        suffix = ".safetensors" if self.weight_format == "safetensors" else ".bin"
        return [f for f in self.files if f.path.endswith(suffix)]

    @property
    def weight_bytes(self) -> int | None:
        sizes = [f.size for f in self.weight_files]
        return None if any(s is None for s in sizes) else sum(s or 0 for s in sizes)

    @property
    def is_adapter(self) -> bool:
        return self.adapter_config is not None

    @property
    def adapter_base(self) -> str | None:
        return (self.adapter_config or {}).get("base_model_name_or_path")

    @property
    def architectures(self) -> list[str]:
        return list((self.config or {}).get("architectures") or [])

    @property
    def model_type(self) -> str | None:
        return (self.config or {}).get("model_type")

    @property
    def needs_custom_code(self) -> bool:
        """The config names Python code in the repo (``auto_map``): mergetui never runs it."""
        return bool((self.config or {}).get("auto_map"))

    def needed_files(self) -> list[str]:
        """The files a merge needs: support files, and safetensors weights (``.bin`` only when
        the repo has no safetensors)."""
        weights = SAFETENSORS_PATTERNS if self.weight_format == "safetensors" else BIN_PATTERNS
        patterns = SUPPORT_FILE_PATTERNS + weights
        return [
            f.path
            for f in self.files
            if "/" not in f.path
            and any(fnmatch.fnmatch(PurePosixPath(f.path).name, p) for p in patterns)
        ]


def repo_info(ref: ModelRef) -> RepoInfo:
    """Resolve ``ref`` to a commit and list its files with sizes; fetch config.json and
    adapter_config.json alone (small files, into the HF cache)."""
    from huggingface_hub import HfApi

    assert ref.repo_id is not None
    repo_id = ref.repo_id
    api = HfApi()
    revision = ref.revision or "main"
    name = ref_name(ref)
    if is_offline():
        raise SourceError(
            f"{name}: hub info needs the Hub, and HF_HUB_OFFLINE is set; "
            "`mergetui hub cached` lists what is available offline"
        )
    with hub_errors(name, ref):
        info = _model_info(api, ref, revision)
        commit = info.sha or revision
        tree = with_retries(
            lambda: list(api.list_repo_tree(repo_id, revision=commit, recursive=True)), name
        )
        files = [
            RepoFile(entry.path, getattr(entry, "size", None))
            for entry in tree
            if type(entry).__name__ == "RepoFile"
        ]
        names = {f.path for f in files}
        config = _fetch_json(ref, commit, "config.json") if "config.json" in names else None
        adapter = (
            _fetch_json(ref, commit, "adapter_config.json")
            if "adapter_config.json" in names
            else None
        )
    return RepoInfo(
        repo_id=ref.repo_id,
        revision=revision,
        commit=commit,
        files=sorted(files, key=lambda f: f.path),
        config=config,
        adapter_config=adapter,
        last_modified=_iso(getattr(info, "last_modified", None)),
        private=getattr(info, "private", None),
        gated=getattr(info, "gated", None),
    )


def _model_info(api: Any, ref: ModelRef, revision: str) -> Any:
    """``model_info`` at ``revision``. Some mirrors answer "no such repo" for a missing revision:
    when the repo exists at main, the error says that the revision is what is missing."""
    from huggingface_hub.errors import RepositoryNotFoundError

    name = ref_name(ref)
    try:
        return with_retries(lambda: api.model_info(ref.repo_id, revision=revision), name)
    except RepositoryNotFoundError:
        if revision == "main":
            raise
        try:
            with_retries(lambda: api.model_info(ref.repo_id, revision="main"), name)
        except RepositoryNotFoundError:
            raise
        raise _revision_missing(name, revision) from None


def _fetch_json(ref: ModelRef, commit: str, filename: str) -> dict[str, Any]:
    from huggingface_hub import hf_hub_download

    assert ref.repo_id is not None
    repo_id = ref.repo_id
    path = with_retries(lambda: hf_hub_download(repo_id, filename, revision=commit), ref_name(ref))
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SourceError(f"{ref_name(ref)}: {filename} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise SourceError(f"{ref_name(ref)}: {filename} is not a JSON object")
    return data


# -- remote headers ------------------------------------------------------------------------------
def remote_tensor_specs(ref: ModelRef, info: RepoInfo) -> dict[str, TensorSpec]:
    """Every tensor's dtype and shape from the safetensors headers on the Hub, read with ranged
    requests (a few KiB per shard), without downloading the weights."""
    specs: dict[str, TensorSpec] = {}
    for weight in info.weight_files:
        header = _remote_header(ref, info.commit, weight.path)
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            code = entry.get("dtype")
            if code not in SAFETENSORS_DTYPES:
                raise SourceError(f"{ref_name(ref)}: {weight.path}: unknown dtype {code!r}")
            dtype, size = SAFETENSORS_DTYPES[code]
            shape = tuple(int(d) for d in entry.get("shape", []))
            start, end = entry.get("data_offsets", [0, 0])
            specs[name] = TensorSpec(name, dtype, shape, Path(weight.path), int(start), end - start)
    return specs


def _remote_header(ref: ModelRef, commit: str, filename: str) -> dict[str, Any]:
    """The JSON header of a safetensors file on the Hub: a ranged GET of its first bytes (a server
    that ignores the range is read only as far as the header goes, then the stream is closed)."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session

    assert ref.repo_id is not None
    url = hf_hub_url(ref.repo_id, filename, revision=commit)
    what = f"{ref_name(ref)}: {filename}"

    def read() -> bytes:
        headers = build_hf_headers()
        headers["Range"] = "bytes=0-65535"
        with get_session().stream("GET", url, headers=headers, follow_redirects=True) as reply:
            if reply.status_code == 404:
                raise SourceError(f"{what}: not found on the Hub")
            if reply.status_code in (401, 403):
                raise SourceError(
                    f"{what}: access denied; log in with `hf auth login` or set HF_TOKEN"
                )
            reply.raise_for_status()
            data = b""
            needed = _HEADER_PREFIX
            for chunk in reply.iter_bytes():
                data += chunk
                if len(data) >= _HEADER_PREFIX:
                    needed = _HEADER_PREFIX + struct.unpack("<Q", data[:_HEADER_PREFIX])[0]
                    if needed > 100 * 1024 * 1024:
                        raise SourceError(f"{what}: header of {needed} bytes; not safetensors?")
                if len(data) >= needed:
                    return data[:needed]
            if reply.status_code == 206 and len(data) < needed:
                return data + _ranged_rest(url, len(data), needed)
            raise SourceError(f"{what}: file ends inside its safetensors header")

    with hub_errors(what, ref):
        raw = with_retries(read, what)
    try:
        header = json.loads(raw[_HEADER_PREFIX:])
    except ValueError as exc:
        raise SourceError(f"{what}: the safetensors header is not valid JSON") from exc
    if not isinstance(header, dict):
        raise SourceError(f"{what}: the safetensors header is not a JSON object")
    return header


def _ranged_rest(url: str, start: int, end: int) -> bytes:
    from huggingface_hub.utils import build_hf_headers, get_session

    headers = build_hf_headers()
    headers["Range"] = f"bytes={start}-{end - 1}"
    reply = get_session().get(url, headers=headers, follow_redirects=True)
    reply.raise_for_status()
    return reply.content[: end - start]


def remote_checkpoint(ref: ModelRef, label: str) -> Checkpoint:
    """A header-only :class:`Checkpoint` of a Hub model: config.json and the safetensors headers,
    read remotely. It can be planned and checked, not merged (``directory`` does not exist)."""
    info = repo_info(ref)
    if info.config is None:
        raise SourceError(
            f"{label}: no config.json in {ref_name(ref)}; mergetui merges Hugging Face "
            "transformers checkpoints"
        )
    if info.weight_format is None:
        raise SourceError(f"{label}: {ref_name(ref)} has no .safetensors or .bin weights")
    specs = remote_tensor_specs(ref, info) if info.weight_format == "safetensors" else {}
    return Checkpoint(
        label=label,
        directory=Path(f"{info.repo_id}@{info.commit}"),
        config=info.config,
        tensors=specs,
        weight_files=[Path(f.path) for f in info.weight_files],
        format=info.weight_format,
        remote=f"{info.repo_id}@{info.commit}",
        size_hint=info.weight_bytes,
    )


def cached_snapshot(ref: ModelRef) -> Path | None:
    """The cached snapshot folder of ``ref`` when it holds config and weights, else None (never
    touches the network)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    assert ref.repo_id is not None
    try:
        folder = Path(snapshot_download(ref.repo_id, revision=ref.revision, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
    names = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    return folder if _holds_model(names) else None


def _holds_model(names: set[str]) -> bool:
    """A config (model or adapter) and weights: enough to merge from, offline."""
    has_config = "config.json" in names or "adapter_config.json" in names
    return has_config and any(n.endswith((".safetensors", ".bin")) for n in names)


# -- cache ----------------------------------------------------------------------------------------
@dataclass
class CachedRevision:
    commit: str
    refs: list[str]
    size_bytes: int
    files: list[str]

    @property
    def usable_offline(self) -> bool:
        """A config and weights are there: a merge can use this revision offline."""
        return _holds_model({PurePosixPath(f).name for f in self.files})


@dataclass
class CachedModel:
    repo_id: str
    size_bytes: int
    last_accessed: float | None
    revisions: list[CachedRevision]


def cached_models() -> list[CachedModel]:
    """Models in the local HF cache (``HF_HOME``/``HF_HUB_CACHE``), newest revision first."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        scan = scan_cache_dir()
    except CacheNotFound:
        return []
    models = []
    for repo in scan.repos:
        if repo.repo_type != "model":
            continue
        revisions = [
            CachedRevision(
                commit=rev.commit_hash,
                refs=sorted(rev.refs),
                size_bytes=rev.size_on_disk,
                files=sorted(f.file_name for f in rev.files),
            )
            for rev in sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True)
        ]
        models.append(CachedModel(repo.repo_id, repo.size_on_disk, repo.last_accessed, revisions))
    return sorted(models, key=lambda m: m.repo_id)


# -- download ----------------------------------------------------------------------------------------
@dataclass
class DownloadProgress:
    repo_id: str
    bytes_done: int
    bytes_total: int
    files_total: int
    elapsed_s: float

    @property
    def eta_s(self) -> float | None:
        if self.bytes_done <= 0 or self.elapsed_s <= 0:
            return None
        rate = self.bytes_done / self.elapsed_s
        return max(0.0, (self.bytes_total - self.bytes_done) / rate)


def download(ref: ModelRef, on_progress: Callable[[DownloadProgress], None] | None = None) -> Path:
    """The snapshot folder of ``ref`` in the HF cache, downloading only the files a merge needs
    (resuming partial files). Offline, the cache alone is used."""
    from huggingface_hub import snapshot_download

    assert ref.repo_id is not None
    repo_id = ref.repo_id
    name = ref_name(ref)
    if is_offline():
        with hub_errors(name, ref):
            folder = Path(
                snapshot_download(
                    repo_id,
                    revision=ref.revision,
                    allow_patterns=SUPPORT_FILE_PATTERNS + SAFETENSORS_PATTERNS + BIN_PATTERNS,
                )
            )
        _require_usable(folder, ref)
        return folder
    info = repo_info(ref)
    if info.needs_custom_code:
        log.warning("%s: config.json has auto_map (custom code); mergetui never runs it", name)
    files = info.needed_files()
    if info.weight_format is None:
        raise SourceError(
            f"{name}: the repo has no .safetensors or .bin weights; is it the right repo?"
        )
    sizes = {f.path: f.size or 0 for f in info.files}
    total = sum(sizes[f] for f in files)
    started = time.perf_counter()
    done = [0]
    lock = threading.Lock()

    def report(advance: int) -> None:
        # huggingface_hub downloads files on several threads: one at a time, in order
        with lock:
            done[0] += advance
            if on_progress is not None:
                on_progress(
                    DownloadProgress(
                        info.repo_id, min(done[0], total), total, len(files),
                        time.perf_counter() - started,
                    )
                )  # fmt: skip

    with hub_errors(name, ref):
        folder = Path(
            with_retries(
                lambda: snapshot_download(
                    repo_id,
                    revision=info.revision,  # by name, so the cache records the ref for offline use
                    allow_patterns=files,
                    tqdm_class=_progress_class(report),
                ),
                name,
            )
        )
    if folder.name != info.commit:
        log.warning("%s moved to %s during the download", name, folder.name)
    report(total - done[0])  # small files are written without byte progress
    _require_usable(folder, ref)
    return folder


def support_files(ref: ModelRef) -> Path:
    """A snapshot folder with only the small files of ``ref`` (config, tokenizer, chat template):
    what checking a vocabulary needs, without a weight (``check`` on a model not downloaded)."""
    from huggingface_hub import snapshot_download

    repo_id = ref.repo_id
    assert repo_id is not None
    name = ref_name(ref)
    with hub_errors(name, ref):
        return Path(
            with_retries(
                lambda: snapshot_download(
                    repo_id, revision=ref.revision, allow_patterns=SUPPORT_FILE_PATTERNS
                ),
                name,
            )
        )


def _require_usable(folder: Path, ref: ModelRef) -> None:
    names = {p.name for p in folder.iterdir()}
    if "config.json" not in names and "adapter_config.json" not in names:
        raise SourceError(
            f"{ref_name(ref)}: no config.json in the repo; mergetui merges Hugging Face "
            "transformers checkpoints (or PEFT adapters)"
        )


def _progress_class(report: Callable[[int], None]) -> type:
    """A silent progress bar whose byte counts go to ``report``.

    huggingface_hub drives two byte bars during a snapshot download: bytes received, and bytes
    written to the files (which also counts what a resumed file already had). The second one
    is reported, so the total matches the files' sizes.
    """
    from huggingface_hub.utils import tqdm as hf_tqdm

    class Progress(hf_tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            name = str(kwargs.get("name") or "")
            self._counts_bytes = kwargs.get("unit") == "B" and not name.endswith("transfer")
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            if self._counts_bytes and n:
                report(int(n))
            return super().update(n)

    return Progress
