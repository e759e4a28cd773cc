"""Real tiny Hugging Face models for the tests, built once per session with save_pretrained.

Fine-tunes are the base plus seeded task vectors, so merges have real, checkable structure.
"""

from __future__ import annotations

import hashlib
import os
import textwrap
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from mergekit_ref import MergekitReference, build_zoo, mergekit_session

#: The device the CUDA checks run on (``bench/gpu_check.sh`` runs the tests marked ``cuda``);
#: ``MERGETUI_CHECK_DEVICE=cpu`` dry-runs them on the CPU.
CHECK_DEVICE = os.environ.get("MERGETUI_CHECK_DEVICE", "cuda")


def check_device_marks() -> list[pytest.MarkDecorator]:
    """The marks of a test that runs on :data:`CHECK_DEVICE`: ``cuda``, skipped without a GPU."""
    import torch

    return [
        pytest.mark.cuda,
        pytest.mark.skipif(
            CHECK_DEVICE.startswith("cuda") and not torch.cuda.is_available(),
            reason="no CUDA device here; bench/gpu_check.sh runs these on a GPU machine",
        ),
    ]


def on_check_device(test: Callable[..., None]) -> Callable[..., None]:
    """Mark one test with :func:`check_device_marks`."""
    for mark in check_device_marks():
        test = mark(test)
    return test


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

TINY_LLAMA = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


@pytest.fixture(autouse=True)
def isolated_state(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Each test gets its own state folder (log, background jobs, autosaved draft), so no test
    sees another's, nor the developer's own."""
    state = tmp_path_factory.mktemp("state")
    monkeypatch.setenv("MERGETUI_LOG_DIR", str(state))
    return state


def save_llama(directory: Path, seed: int, dtype: str = "bfloat16", **overrides: object) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **overrides}))
    model.to(getattr(torch, dtype)).save_pretrained(directory)
    return directory


def save_qwen2(directory: Path, seed: int) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**TINY_LLAMA))
    model.to(torch.bfloat16).save_pretrained(directory)
    return directory


def save_finetune(
    base: Path, directory: Path, seed: int, scale: float = 0.05, max_shard_size: str | None = None
) -> Path:
    """Base + a seeded dense task vector, saved like a real fine-tune."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=generator) * scale
            param.add_(noise.to(param.dtype))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (base / name).is_file():  # a fine-tune ships its base's tokenizer, as real ones do
            (directory / name).write_bytes((base / name).read_bytes())
    return directory


class MergeGate:
    """Holds the merges a test starts in child processes (background jobs, ``mergetui run``) after
    their first tensor, until they are cancelled or :meth:`release` is called; so a test that must
    act while a merge is running does not depend on how fast this machine merges. It works through
    the environment those processes inherit (``mergetui.pauses``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
        self._monkeypatch = monkeypatch
        self._released = folder / "release-merges"

    def hold(self) -> None:
        """Merges started from now on wait after their first tensor."""
        self._released.unlink(missing_ok=True)
        self._monkeypatch.setenv("MERGETUI_PAUSE_AT", "tensor:1")
        self._monkeypatch.setenv("MERGETUI_PAUSE_RELEASE", str(self._released))

    @property
    def environment(self) -> dict[str, str]:
        """The variables that hold a merge, for a process started with its own environment."""
        return {"MERGETUI_PAUSE_AT": "tensor:1", "MERGETUI_PAUSE_RELEASE": str(self._released)}

    def release(self) -> None:
        """Held merges go on to the end."""
        self._released.touch()


@pytest.fixture
def merge_gate(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> MergeGate:
    return MergeGate(monkeypatch, tmp_path_factory.mktemp("gate"))


def ties_recipe(models: dict[str, Path], output: Path | str) -> str:
    """The recipe many tests run: a TIES merge of ``ft_a`` and ``ft_c`` onto ``base``, on CPU."""
    return (
        f'version = 1\n[merge]\nmethod = "ties"\nbase = "{models["base"]}"\ndevice = "cpu"\n'
        f'[[models]]\nmodel = "{models["ft_a"]}"\nweight = 1.0\ndensity = 0.5\n'
        f'[[models]]\nmodel = "{models["ft_c"]}"\nweight = 1.0\ndensity = 0.5\n'
        f'[output]\npath = "{output}"\n'
    )


#: A value for each parameter a method needs, for tests and checks that run every method.
SAMPLE_VALUES = {"weight": 0.6, "density": 0.5, "t": 0.4, "scale": 1.0}


def method_recipe(
    method: str,
    base: Path,
    models: list[Path],
    output: Path,
    *,
    device: str = "cpu",
    dtype: str = "float32",
) -> str:
    """A recipe running ``method`` on ``models`` (fewer if the method takes fewer), its parameters
    from :data:`SAMPLE_VALUES` (defaults otherwise), driven by the registry so a new method is
    covered without a new table here. Used by the CUDA tests and ``bench/gpu_check.py``."""
    from mergetui.methods.registry import get_method

    spec = get_method(method)
    assert spec is not None, method
    chosen = models[: spec.max_models] if spec.max_models else models
    merge = f'method = "{method}"\ndevice = "{device}"\ndtype = "{dtype}"\nseed = 7\n'
    if spec.needs_base:
        merge += f'base = "{base}"\n'
    wanted = [p for p in spec.params if p.required or p.name in SAMPLE_VALUES]
    global_values = "".join(
        f"{p.name} = {SAMPLE_VALUES[p.name]}\n" for p in wanted if p.scope == "global"
    )
    entries = "".join(
        f'[[models]]\nmodel = "{path}"\n'
        + "".join(f"{p.name} = {SAMPLE_VALUES[p.name]}\n" for p in wanted if p.scope == "model")
        for path in chosen
    )
    return (
        f"version = 1\n[merge]\n{merge}[merge.parameters]\n{global_values}{entries}"
        f'[output]\npath = "{output}"\n'
    )


def tree_digest(directory: Path) -> dict[str, str]:
    """sha256 of every file under ``directory``: proof that sources were not touched."""
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The session's model zoo (read-only for tests: copy before modifying)."""
    from mergetui.demo import save_char_tokenizer

    root = tmp_path_factory.mktemp("models")
    zoo: dict[str, Path] = {}
    zoo["base"] = save_llama(root / "base", seed=0)
    save_char_tokenizer(zoo["base"])
    zoo["ft_a"] = save_finetune(zoo["base"], root / "ft_a", seed=1)
    zoo["ft_b"] = save_finetune(zoo["base"], root / "ft_b", seed=2, max_shard_size="20KB")
    zoo["ft_c"] = save_finetune(zoo["base"], root / "ft_c", seed=3)
    zoo["qwen2"] = save_qwen2(root / "qwen2", seed=4)
    zoo["big_vocab"] = save_llama(root / "big_vocab", seed=5, vocab_size=72)
    zoo["wide"] = save_llama(root / "wide", seed=6, intermediate_size=96)
    return zoo


@pytest.fixture
def write_recipe(tmp_path: Path) -> Callable[..., Path]:
    """Write a recipe TOML into the test's folder and return its path."""

    def write(text: str, name: str = "recipe.toml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path

    return write


@pytest.fixture(scope="session")
def mergekit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MergekitReference]:
    """The real mergekit (its own venv, one worker process per session) as a reference; skips
    without ``$MERGETUI_MERGEKIT_PYTHON``, fails instead with ``MERGETUI_REQUIRE_MERGEKIT=1``."""
    with mergekit_session(tmp_path_factory.mktemp("mergekit")) as reference:
        yield reference


@pytest.fixture(scope="session")
def mk_zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """float32 tiny Llamas (4 layers) for the mergekit comparisons: ``base``, ``ft1``..``ft3``."""
    return build_zoo(tmp_path_factory.mktemp("mk-models"))


@pytest.fixture(scope="session")
def wide(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A base and two fine-tunes whose embedding and lm_head hold 4M entries (16384 × 256): more
    than DARE's whole-chunk alignment needs for several blocks, and big enough that a small
    explicit budget must block them."""
    root = tmp_path_factory.mktemp("wide")
    shape = dict(vocab_size=16384, hidden_size=256, intermediate_size=512, num_attention_heads=4)
    base = save_llama(root / "base", seed=10, **shape)
    return {
        "base": base,
        "ft_a": save_finetune(base, root / "ft_a", seed=11, scale=0.02),
        "ft_c": save_finetune(base, root / "ft_c", seed=12, scale=0.02),
    }


@pytest.fixture(scope="module")
def fused_experts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A base and two fine-tunes of a Mixtral stored in transformers 5's fused layout, whose
    experts' weights are 3-D tensors (experts × rows × columns: gate_up_proj 4 × 8192 × 256)."""
    import torch
    from test_mergekit_architectures import rewrite_fused
    from transformers import MixtralConfig, MixtralForCausalLM

    root = tmp_path_factory.mktemp("fused")
    config = MixtralConfig(
        **{**TINY_LLAMA, "hidden_size": 256, "intermediate_size": 4096, "num_hidden_layers": 1},
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    found = {}
    for name, seed in (("base", 50), ("ft_a", 51), ("ft_c", 52)):
        torch.manual_seed(seed)
        MixtralForCausalLM(config).to(torch.bfloat16).save_pretrained(root / name)
        rewrite_fused(root / name)
        found[name] = root / name
    return found


@pytest.fixture
def many_workers(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """The C loops' pool with 7 workers (on any machine), restored afterwards."""
    from mergetui.methods import native

    native._pool()  # the original pool exists first, so monkeypatch restores it
    pool = ThreadPoolExecutor(7, thread_name_prefix="test-workers")
    monkeypatch.setitem(native._state, "pool", pool)
    monkeypatch.setitem(native._state, "workers", 7)
    yield 7
    pool.shutdown()


@pytest.fixture
def one_worker(monkeypatch: pytest.MonkeyPatch) -> int:
    """The C loops run on the calling thread only."""
    from mergetui.methods import native

    native._pool()
    monkeypatch.setitem(native._state, "workers", 1)
    return 1
