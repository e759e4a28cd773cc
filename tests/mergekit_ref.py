"""The real mergekit as a reference for mergetui's output, and the comparisons the tests make.

mergekit is never imported here, nor by mergetui: it lives in its own venv (``.ci/run`` makes one,
``$MERGETUI_MERGEKIT_PYTHON`` names its python) and runs in one long-lived worker process
(``tests/mergekit_worker.py``), which pays the imports of torch, transformers and mergekit once per
test session and then merges one request at a time.

- :class:`MergekitReference` (the session fixture ``mergekit`` in ``conftest.py``):
  ``mergekit.merge(yaml_text, out_dir)`` runs a merge as ``mergekit-yaml`` would;
- :func:`assert_same_model`: same tensors, shapes, dtypes and values (within a relative tolerance);
- :func:`assert_same_config`: same ``config.json``, but for :data:`CONFIG_IGNORE`;
- :func:`build_zoo` (the session fixture ``mk_zoo``, and ``arch_zoo`` for other architectures):
  float32 tiny models both tools merge.

Without ``$MERGETUI_MERGEKIT_PYTHON`` the tests that use the fixture skip, loudly; with
``MERGETUI_REQUIRE_MERGEKIT=1`` (as in CI) they fail instead.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, NoReturn

#: The mergekit release the reference must be (the worker reports what it imported).
MERGEKIT_VERSION = "0.1.5"
WORKER = Path(__file__).with_name("mergekit_worker.py")
#: Hang detectors only, far above what anything takes here (imports: seconds; a merge: < 1 s).
START_TIMEOUT_S = 240.0
MERGE_TIMEOUT_S = 240.0
SETUP_HINT = (
    "python3 -m venv /tmp/mergetui-mergekit-venv && /tmp/mergetui-mergekit-venv/bin/pip install "
    "torch==2.13.0 && /tmp/mergetui-mergekit-venv/bin/pip install mergekit==0.1.5, then "
    "MERGETUI_MERGEKIT_PYTHON=/tmp/mergetui-mergekit-venv/bin/python"
)


def mergekit_unavailable(reason: str) -> NoReturn:
    """Skip a mergekit comparison loudly, or fail it where ``MERGETUI_REQUIRE_MERGEKIT=1``."""
    import pytest

    if os.environ.get("MERGETUI_REQUIRE_MERGEKIT", "0") not in ("", "0"):
        pytest.fail(
            f"the mergekit comparisons cannot run, and MERGETUI_REQUIRE_MERGEKIT=1 says they must: "
            f"{reason}",
            pytrace=False,
        )
    pytest.skip(f"SKIPPED LOUDLY: {reason}")


def mergekit_python() -> str:
    """The mergekit venv's python, from ``$MERGETUI_MERGEKIT_PYTHON``; skips (or fails) without."""
    python = os.environ.get("MERGETUI_MERGEKIT_PYTHON")
    if not python:
        mergekit_unavailable(
            f"the mergekit comparisons need MERGETUI_MERGEKIT_PYTHON (a python with mergekit "
            f"{MERGEKIT_VERSION}): {SETUP_HINT}"
        )
    if not Path(python).is_file():
        mergekit_unavailable(f"MERGETUI_MERGEKIT_PYTHON={python} does not exist: {SETUP_HINT}")
    return python


class MergekitReference:
    """One mergekit worker process serving merges, one at a time, for the whole test session.

    The process starts at construction (its imports overlap with whatever the tests do next) and is
    waited for at the first :meth:`merge`. If it cannot start, or is not mergekit
    :data:`MERGEKIT_VERSION`, the test skips (or fails, see :func:`mergekit_unavailable`); if it
    dies or hangs later, the merge fails and the next one starts a new worker.
    """

    def __init__(self, python: str, folder: Path) -> None:
        self.python = python
        self.folder = folder
        self.versions: dict[str, str] = {}
        self._process: subprocess.Popen[str] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._log: Path | None = None
        self._starts = 0
        self._unavailable: str | None = (
            None  # why the worker cannot start: later tests skip at once
        )
        self._start()

    # -- the worker ----------------------------------------------------------------------------
    def _start(self) -> None:
        self._starts += 1
        self._log = self.folder / f"worker-{self._starts}.log"
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        env.update(
            PYTHONHASHSEED="0",  # repeatable set/dict orders, hence repeatable merges
            PYTHONUNBUFFERED="1",
            CUDA_VISIBLE_DEVICES="",  # the CPU only, like the mergetui side of the comparisons
            HF_HUB_OFFLINE="1",
            HF_HUB_DISABLE_TELEMETRY="1",
            TRANSFORMERS_VERBOSITY="error",
        )
        with self._log.open("w") as log:
            self._process = subprocess.Popen(
                [self.python, str(WORKER)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                cwd=self.folder,
                env=env,
                start_new_session=True,  # Ctrl-C in pytest reaches pytest; close() ends the worker
            )
        self._lines = queue.Queue()
        threading.Thread(
            target=self._read, args=(self._process, self._lines), daemon=True, name="mergekit-out"
        ).start()
        self._ready = False

    @staticmethod
    def _read(process: subprocess.Popen[str], lines: queue.Queue[str | None]) -> None:
        assert process.stdout is not None
        with process.stdout:  # closed here, at the end, not under this thread's feet
            for line in process.stdout:
                lines.put(line)
        lines.put(None)  # end of output: the worker exited

    def _reply(self, timeout: float, doing: str) -> dict[str, Any]:
        """The worker's next JSON line; raises RuntimeError if it exits or hangs first."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.close()
                raise RuntimeError(
                    f"the mergekit worker gave no answer within {timeout:.0f} s while {doing} "
                    f"(hang detector; it was killed); its log:\n{self.log_tail()}"
                ) from None
            if line is None:
                assert self._process is not None
                code = self._process.wait()
                self._process = None
                raise RuntimeError(
                    f"the mergekit worker exited (code {code}) while {doing}; its log:\n"
                    f"{self.log_tail()}"
                )
            try:
                return dict(json.loads(line))
            except ValueError:
                continue  # not a protocol line (the worker keeps stdout for replies; be safe)

    def _ensure_ready(self) -> None:
        if self._unavailable:
            mergekit_unavailable(self._unavailable)
        if self._process is None:
            self._start()
        if self._ready:
            return
        try:
            hello = self._reply(START_TIMEOUT_S, "starting (importing mergekit)")
        except RuntimeError as exc:
            self._unavailable = f"mergekit did not start with {self.python}: {exc}"
            mergekit_unavailable(self._unavailable)
        self.versions = dict(hello.get("versions", {}))
        found = self.versions.get("mergekit")
        if found != MERGEKIT_VERSION:
            self.close()
            self._unavailable = (
                f"{self.python} has mergekit {found}, the comparisons are made against "
                f"{MERGEKIT_VERSION}: {SETUP_HINT}"
            )
            mergekit_unavailable(self._unavailable)
        self._ready = True

    def log_tail(self, lines: int = 40) -> str:
        if self._log is None or not self._log.is_file():
            return "(no log)"
        return "\n".join(self._log.read_text(errors="replace").splitlines()[-lines:])

    def close(self) -> None:
        process, self._process = self._process, None
        self._ready = False
        if process is None:
            return
        if process.stdin is not None:
            with suppress(OSError):
                process.stdin.close()
        if process.poll() is None:
            # Nothing to save between merges, and a clean interpreter exit after torch takes
            # seconds: end it now.
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    # -- merging -------------------------------------------------------------------------------
    def merge(self, config_yaml: str, out_dir: Path, **options: Any) -> Path:
        """Run mergekit on ``config_yaml`` (``mergekit-yaml`` YAML) into ``out_dir``; return it.

        ``options`` override the worker's :class:`mergekit.options.MergeOptions` defaults (CPU,
        tokenizer copied, seed 0, ...). Raises AssertionError with mergekit's traceback if the
        merge fails.
        """
        self._ensure_ready()
        assert self._process is not None and self._process.stdin is not None
        request = {"config": config_yaml, "out": str(Path(out_dir).resolve()), "options": options}
        try:
            self._process.stdin.write(json.dumps(request) + "\n")
            self._process.stdin.flush()
            reply = self._reply(MERGE_TIMEOUT_S, f"merging into {out_dir}")
        except (OSError, RuntimeError) as exc:
            self.close()
            raise AssertionError(f"mergekit failed to merge into {out_dir}: {exc}") from None
        if not reply.get("ok"):
            raise AssertionError(
                f"mergekit failed to merge into {out_dir}:\n{reply.get('error')}\n"
                f"the config:\n{config_yaml}"
            )
        return Path(out_dir)


@contextmanager
def mergekit_session(folder: Path) -> Iterator[MergekitReference]:
    """The body of the ``mergekit`` fixture: a reference for the block, its worker ended after."""
    reference = MergekitReference(mergekit_python(), folder)
    try:
        yield reference
    finally:
        reference.close()


# -- comparing outputs -----------------------------------------------------------------------------


def read_tensors(directory: Path) -> dict[str, Any]:
    """Every tensor of a safetensors checkpoint (all shards), by name; checks the index if any."""
    from safetensors import safe_open

    files = sorted(Path(directory).glob("*.safetensors"))
    assert files, f"no .safetensors file in {directory}"
    tensors: dict[str, Any] = {}
    where: dict[str, str] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                assert name not in tensors, f"{name} is in both {where[name]} and {file.name}"
                tensors[name] = handle.get_tensor(name)
                where[name] = file.name
    index = Path(directory) / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        assert weight_map == where, f"{index} does not map the tensors to the shards they are in"
    else:
        assert len(files) == 1, f"{directory} has {len(files)} shards and no index"
    return tensors


def assert_same_model(ours: Path, theirs: Path, rel: float = 1e-6) -> None:
    """``ours`` and ``theirs`` hold the same tensor names, shapes, dtypes, and values within
    ``rel``: for each tensor, ``max|a - b| <= rel * max(1, max|b|)`` (NaNs must coincide)."""
    assert_same_tensors(read_tensors(ours), read_tensors(theirs), ours, theirs, rel)


def assert_same_tensors(
    a: dict[str, Any], b: dict[str, Any], ours: object, theirs: object, rel: float = 1e-6
) -> None:
    """:func:`assert_same_model` on tensors already read (``ours``/``theirs`` name them in the
    message): for outputs compared another way than file by file, e.g. as transformers loads them.
    """
    import torch

    assert a.keys() == b.keys(), (
        f"tensor names differ: only in {ours}: {sorted(a.keys() - b.keys())}; "
        f"only in {theirs}: {sorted(b.keys() - a.keys())}"
    )
    problems: list[tuple[float, str]] = []
    for name in sorted(a):
        x, y = a[name], b[name]
        if x.shape != y.shape or x.dtype != y.dtype:
            problems.append(
                (
                    float("inf"),
                    f"{name}: ours {x.dtype} {list(x.shape)}, theirs {y.dtype} {list(y.shape)}",
                )
            )
            continue
        x64, y64 = x.to(torch.float64), y.to(torch.float64)
        if not torch.equal(x64.isnan(), y64.isnan()):
            problems.append((float("inf"), f"{name}: NaN in different places"))
            continue
        if x.numel() == 0:
            continue
        diff = (x64 - y64).abs().nan_to_num(nan=0.0)
        diff[x64 == y64] = 0.0  # equal infinities
        worst = float(diff.max())
        limit = rel * max(1.0, float(y64.abs().nan_to_num(nan=0.0).max()))
        if not worst <= limit:
            flat = int(diff.argmax())
            position = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), x.shape))
            problems.append(
                (
                    worst / limit,
                    f"{name}: max |ours - theirs| = {worst:.3g} > {limit:.3g} at {position} "
                    f"(ours {float(x64.reshape(-1)[flat])!r}, "
                    f"theirs {float(y64.reshape(-1)[flat])!r})",
                )
            )
    if problems:
        problems.sort(key=lambda p: -p[0])
        shown = "\n  ".join(text for _, text in problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise AssertionError(
            f"{len(problems)} of {len(a)} tensors differ between {ours} (ours) and {theirs} "
            f"(mergekit), rel={rel}, worst first:\n  {shown}{more}"
        )


#: ``config.json`` keys whose values legitimately differ between mergetui's output and mergekit's.
#: mergetui copies the base's ``config.json`` as a dict and sets only its dtype key; mergekit loads
#: it with ``AutoConfig`` and writes it back with ``save_pretrained`` of its own venv's
#: transformers. With the zoo's models (written by transformers 5 in the test venv) every key comes
#: out the same, ``dtype`` spelling included, except possibly:
#:
#: - ``transformers_version``: ``save_pretrained`` stamps the running transformers' version, so
#:   mergekit's file says its venv's version while mergetui keeps the one that wrote the base. The
#:   two agree only while both venvs resolve the same transformers release (they do here: 5.24.0).
#:   It is metadata: transformers re-stamps it on every save and reads it only to special-case
#:   checkpoints written before 5.0 (tokenizer loading), which neither side is (mergekit 0.1.5
#:   needs transformers >= 5).
#:
#: Not ignored, because they do not differ with these models: a base written by transformers 4
#: would come out of mergekit re-serialized in the 5.x schema (``dtype`` for ``torch_dtype``,
#: ``rope_parameters`` for ``rope_theta``) while mergetui keeps it as written; a test with such a
#: base would have to account for that explicitly.
CONFIG_IGNORE: tuple[str, ...] = ("transformers_version",)


def assert_same_config(ours: Path, theirs: Path, ignore: Iterable[str] = CONFIG_IGNORE) -> None:
    """The two outputs' ``config.json`` are the same dict, but for the top-level keys ``ignore``."""
    skip = set(ignore)
    a = {k: v for k, v in json.loads((ours / "config.json").read_text()).items() if k not in skip}
    b = {k: v for k, v in json.loads((theirs / "config.json").read_text()).items() if k not in skip}
    if a != b:
        rows = [
            f"{key}: ours {a.get(key, '(missing)')!r}, theirs {b.get(key, '(missing)')!r}"
            for key in sorted(a.keys() | b.keys())
            if a.get(key, ...) != b.get(key, ...)
        ]
        raise AssertionError(
            f"config.json differs between {ours} (ours) and {theirs} (mergekit), "
            f"ignoring {sorted(skip)}:\n  " + "\n  ".join(rows)
        )


# -- models both tools merge -----------------------------------------------------------------------


def save_finetune_f32(base: Path, directory: Path, seed: int, scale: float = 0.05) -> Path:
    """Base + a seeded dense task vector, float32, with the base's tokenizer files."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    model.save_pretrained(directory)
    for file in base.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens")):
            (directory / file.name).write_bytes(file.read_bytes())
    return directory


def tiny_llama_config() -> Any:
    """The zoo's default architecture: the test suite's tiny Llama (``conftest.TINY_LLAMA``), with
    4 layers so layer gradients and slices have room."""
    from conftest import TINY_LLAMA
    from transformers import LlamaConfig

    settings: dict[str, Any] = {**TINY_LLAMA, "num_hidden_layers": 4}
    return LlamaConfig(**settings)


def save_random_f32(directory: Path, config: Any, seed: int) -> Path:
    """A causal LM of ``config``'s architecture with transformers' own random init under
    ``seed``, saved float32 with ``save_pretrained`` (so in the layout a real checkpoint has)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.to(torch.float32).save_pretrained(directory)
    return directory


def build_zoo(
    root: Path, config: Callable[[], Any] = tiny_llama_config, seed: int = 10
) -> dict[str, Path]:
    """float32 tiny models of one architecture (``config()``, a transformers config; by default
    the Llama of :func:`tiny_llama_config`): ``base`` (random, ``seed``) and ``ft1``..``ft3``
    (base + noise seeded ``seed + n``), each with the demo's character tokenizer, so both tools
    copy one.

    float32 because mergekit computes in the storage dtype and mergetui in float32: with float32
    inputs both compute in float32 and the comparisons can be tight.
    """
    from mergetui.demo import save_char_tokenizer

    zoo = {"base": save_random_f32(root / "base", config(), seed=seed)}
    save_char_tokenizer(zoo["base"])
    for n in (1, 2, 3):
        zoo[f"ft{n}"] = save_finetune_f32(zoo["base"], root / f"ft{n}", seed=seed + n)
    return zoo
