"""Loading models for generation and scoring, one at a time or all together, as memory allows."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergetui.errors import SourceError
from mergetui.sources.refs import parse_ref
from mergetui.sources.resolve import resolve_dir

log = logging.getLogger(__name__)
#: Loaded weights take about their file size; activations, caches and the allocator add to it.
_OVERHEAD = 1.3
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.*")


@dataclass
class LoadedModel:
    name: str
    path: Path
    model: Any
    tokenizer: Any
    device: str
    load_s: float


def model_path(reference: str, base_dir: Path | None = None) -> Path:
    """The local folder of a model named by path or Hub id (downloaded into the cache if needed)."""
    ref = parse_ref(reference, base_dir or Path.cwd())
    path = resolve_dir(ref)
    if not (path / "config.json").is_file():
        raise SourceError(f"{reference}: no config.json in {path}; is it a model folder?")
    return path


def weight_bytes(path: Path) -> int:
    files = list(path.glob("*.safetensors")) or list(path.glob("*.bin"))
    return sum(f.stat().st_size for f in files)


def available_bytes(device: str) -> int:
    """Free memory on ``device``: CUDA's free memory, or the host's available RAM."""
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def fit_together(paths: list[Path], device: str) -> bool:
    """Whether every model fits on ``device`` at once (estimated from the weight files)."""
    needed = sum(weight_bytes(p) for p in paths) * _OVERHEAD
    return needed <= available_bytes(device)


def load_model(name: str, path: Path, device: str) -> LoadedModel:
    """A model and its tokenizer, in the checkpoint's dtype (float32 on CPU for speed and
    precision), never running code from the repo (no ``trust_remote_code``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    if not any(any(path.glob(pattern)) for pattern in _TOKENIZER_FILES):
        raise SourceError(
            f"{name}: cannot load its tokenizer: no tokenizer files in {path} (tokenizer.json, "
            "tokenizer_config.json, tokenizer.model, vocab.*); save one with the model"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise SourceError(f"{name}: cannot load its tokenizer from {path}: {exc}") from exc
    dtype = torch.float32 if device == "cpu" else "auto"
    try:
        loaded: Any = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        model = loaded.to(device).eval()
    except (OSError, ValueError) as exc:
        raise SourceError(f"{name}: cannot load the model from {path}: {exc}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(name, path, model, tokenizer, device, time.perf_counter() - started)


@contextmanager
def loaded_in_turn(
    names: list[str], paths: list[Path], device: str
) -> Iterator[Iterator[LoadedModel]]:
    """Yield an iterator over the loaded models: all kept loaded when they fit together,
    else each loaded in turn and released before the next (peak memory: one model)."""
    together = fit_together(paths, device)
    log.info("loading %d model(s) %s", len(paths), "together" if together else "one at a time")
    cache: dict[int, LoadedModel] = {}

    def each() -> Iterator[LoadedModel]:
        for index, (name, path) in enumerate(zip(names, paths, strict=True)):
            loaded = cache.get(index) or load_model(name, path, device)
            if together:
                cache[index] = loaded
            yield loaded
            if not together:
                del loaded
                _release(device)

    try:
        yield each()
    finally:
        cache.clear()
        _release(device)


def _release(device: str) -> None:
    import gc

    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


class _ThreadLimits:
    """Torch's CPU thread count is process-wide, and generations and scorings may run side by
    side (the TUI's workers): while any limit holds, torch uses the smallest; when the last ends,
    torch's own count is back."""

    lock = threading.Lock()
    active: list[int] = []
    saved = 0


@contextmanager
def torch_thread_limit(limit: int) -> Iterator[int]:
    """Run torch's CPU ops on at most ``limit`` threads while the block runs; yields the count in
    force."""
    import torch

    with _ThreadLimits.lock:
        if not _ThreadLimits.active:
            _ThreadLimits.saved = torch.get_num_threads()
        _ThreadLimits.active.append(max(1, limit))
        torch.set_num_threads(min([_ThreadLimits.saved, *_ThreadLimits.active]))
        threads = torch.get_num_threads()
    try:
        yield threads
    finally:
        with _ThreadLimits.lock:
            _ThreadLimits.active.remove(max(1, limit))
            torch.set_num_threads(min([_ThreadLimits.saved, *_ThreadLimits.active]))


def torch_threads() -> int:
    """Torch's own CPU thread count (one per core), whatever limit holds now."""
    import torch

    with _ThreadLimits.lock:
        return _ThreadLimits.saved if _ThreadLimits.active else torch.get_num_threads()


@contextmanager
def leave_a_core_for_the_ui() -> Iterator[int]:
    """One torch CPU thread fewer than torch would use, for generating or scoring in a thread of
    a process that also runs the UI (the TUI's compare step); yields the count in force.

    Why: torch's OpenMP threads, one per core, spin-wait between ops. Beside them the UI thread
    starves, and it holds the GIL that the generating thread needs back after every op. On 2
    cores, the demo's model generated 22-60 tokens/s inside the TUI on torch's 2 threads, and
    150-200 on one (``bench/bench_generation.py --tui``)."""
    with torch_thread_limit(max(1, torch_threads() - 1)) as threads:
        yield threads
