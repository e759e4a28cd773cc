"""Small demo models trained locally, so the quickstart needs no network or download.

A tiny Llama-style base model with a character-level tokenizer learns two toy skills in their easy
forms (one-digit addition, reversing 1–3 letters) and meets some hard examples; two specialists are
then fine-tuned from it, at a low learning rate, on the hard form of one skill each (two-digit
addition: "math"; reversing 4–6 letters: "code"). That is the regime where TIES and task
arithmetic are known to work: small fine-tunes of one capable base. Training is seeded and runs on
the CPU in a minute or two, once: the trained models are cached under
``~/.cache/mergetui/demo-models/`` (keyed by a hash of ``DEMO_CONFIG``) and copied into each demo
folder. Held-out task files let ``mergetui eval`` show what a merge kept.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import random
import shutil
import string
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from mergetui.logs import cache_dir

DEMO_RECIPE = "demo-ties.toml"
DEMO_SWEEP = "demo-sweep.toml"  # a sweep of the demo recipe, written beside it
MODEL_NAMES = ("base", "ft-math", "ft-code")
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
VOCAB = list(SPECIAL_TOKENS) + list(string.ascii_lowercase + string.digits + " +-*/=().,:;\n")


def bundled_recipe_text(name: str = DEMO_RECIPE) -> str:
    """A recipe shipped with the package (from ``recipes/`` in the source tree)."""
    packaged = importlib.resources.files("mergetui").joinpath("_recipes").joinpath(name)
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    source_tree = Path(__file__).resolve().parent.parent / "recipes" / name
    return source_tree.read_text(encoding="utf-8")


def save_char_tokenizer(directory: Path) -> None:
    """A character-level fast tokenizer, built offline with the ``tokenizers`` library."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(VOCAB)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    tokenizer.save_pretrained(directory)


#: Everything that shapes the demo models; a change retrains them (the cache key hashes it).
DEMO_CONFIG: dict[str, Any] = {
    "model": {"hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 3, "heads": 4},
    # The base meets some hard examples, so it starts each skill partly learned (the regime where
    # merging works: specialists are small, low-learning-rate fine-tunes of a capable base).
    "base": {"steps": 1800, "lr": 1e-3, "hard_share": {"math": 0.2, "code": 0.05}, "seed": 1},
    "specialist": {"steps": 300, "lr": 1e-4, "replay_share": 0.3},
    "batch_size": 64,
    "version": 2,
}
TASKS = ("math", "code")
EVAL_ROWS = 100
_LETTERS = string.ascii_lowercase


def task_example(task: str, rng: random.Random, hard: bool) -> tuple[str, str]:
    """One prompt/answer pair of a toy skill.

    ``math``: addition, one-digit operands when easy, two-digit when hard (``57+38=`` → ``95``).
    ``code``: reverse a string, 1–3 letters when easy, 4–6 when hard (``r:abcd=`` → ``dcba``).
    The base model learns the easy forms and meets a few hard ones; each specialist is fine-tuned on
    the hard form of its own skill.
    """
    if task == "math":
        low, high = (10, 99) if hard else (0, 9)
        a, b = rng.randint(low, high), rng.randint(low, high)
        return f"{a}+{b}=", str(a + b)
    length = rng.randint(4, 6) if hard else rng.randint(1, 3)
    word = "".join(rng.choice(_LETTERS) for _ in range(length))
    return f"r:{word}=", word[::-1]


def eval_rows(task: str) -> list[dict[str, str]]:
    """The held-out rows of a demo task file (never seen in training)."""
    rng = random.Random(f"eval-{task}")
    rows: dict[str, str] = {}
    while len(rows) < EVAL_ROWS:
        prompt, answer = task_example(task, rng, hard=True)
        rows[prompt] = answer
    return [{"prompt": p, "answer": a} for p, a in rows.items()]


def task_file_text(task: str) -> str:
    return "".join(json.dumps(row) + "\n" for row in eval_rows(task))


def _model_config() -> Any:
    from transformers import LlamaConfig

    shape = DEMO_CONFIG["model"]
    return LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["num_hidden_layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["heads"],
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )


def _train(
    model: Any,
    sample: Callable[[random.Random], tuple[str, str]],
    steps: int,
    lr: float,
    seed: int,
    on_step: Callable[[int, int], None] | None,
) -> None:
    """Next-token training on the answer part of each example (prompt tokens are context)."""
    import torch

    stoi = {token: index for index, token in enumerate(VOCAB)}
    held_out = {row["prompt"] for task in TASKS for row in eval_rows(task)}
    rng = random.Random(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        batch: list[tuple[list[int], list[int]]] = []
        while len(batch) < DEMO_CONFIG["batch_size"]:
            prompt, answer = sample(rng)
            if prompt not in held_out:
                batch.append(([stoi[c] for c in prompt], [stoi[c] for c in answer] + [2]))
        width = max(len(p) + len(a) for p, a in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        weight = torch.zeros((len(batch), width))
        for row, (prompt_ids, answer_ids) in enumerate(batch):
            sequence = prompt_ids + answer_ids
            ids[row, : len(sequence)] = torch.tensor(sequence)
            weight[row, len(prompt_ids) : len(sequence)] = 1.0
        logits = model(input_ids=ids).logits[:, :-1]
        losses = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
        )
        target_weight = weight[:, 1:].reshape(-1)
        loss = (losses * target_weight).sum() / target_weight.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if on_step is not None:
            on_step(step + 1, steps)
    model.eval()


def train_demo_models(
    folders: dict[str, Path], on_step: Callable[[str, int, int], None] | None = None
) -> None:
    """Train the base, then fine-tune one specialist per skill from it (seeded, on the CPU)."""
    import torch
    from transformers import LlamaForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(threads, 4)))
    try:
        base_settings, special = DEMO_CONFIG["base"], DEMO_CONFIG["specialist"]
        torch.manual_seed(base_settings["seed"])
        base = LlamaForCausalLM(_model_config())

        def base_sample(rng: random.Random) -> tuple[str, str]:
            task = rng.choice(TASKS)
            return task_example(task, rng, hard=rng.random() < base_settings["hard_share"][task])

        _train(base, base_sample, base_settings["steps"], base_settings["lr"], base_settings["seed"],
               _reporter("base", on_step))  # fmt: skip
        base.save_pretrained(folders["base"])
        save_char_tokenizer(folders["base"])
        for index, task in enumerate(TASKS):
            name = f"ft-{task}"
            model = LlamaForCausalLM.from_pretrained(folders["base"])

            def sample(rng: random.Random, task: str = task) -> tuple[str, str]:
                if rng.random() < special["replay_share"]:
                    return task_example(rng.choice(TASKS), rng, hard=False)
                return task_example(task, rng, hard=True)

            _train(model, sample, special["steps"], special["lr"], 100 + index,
                   _reporter(name, on_step))  # fmt: skip
            model.save_pretrained(folders[name])
            save_char_tokenizer(folders[name])
    finally:
        torch.set_num_threads(threads)


def _reporter(
    name: str, on_step: Callable[[str, int, int], None] | None
) -> Callable[[int, int], None] | None:
    if on_step is None:
        return None
    return lambda done, total: on_step(name, done, total)


def _quiet_transformers() -> None:
    """The demo prints its own progress; transformers' per-file bars would only add noise."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _cache_key() -> str:
    return hashlib.blake2b(
        json.dumps(DEMO_CONFIG, sort_keys=True).encode(), digest_size=6
    ).hexdigest()


def trained_models_dir() -> Path:
    """The trained demo models of the current ``DEMO_CONFIG``, shared by every demo folder (and the
    test suite, and ``screenshots/make.py``): training is the slow part, and is the same for all."""
    return cache_dir() / "demo-models" / _cache_key()


def _train_into_cache(force: bool, on_step: Callable[[str, int, int], None] | None) -> Path:
    """The cached trained models, training them first if they are not there (or ``force``).
    Trained into a scratch folder and renamed into place, so a killed training leaves nothing
    that looks complete and a concurrent one cannot be half-read."""
    target = trained_models_dir()
    if target.is_dir() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(".*-*-*"):  # left by a training that was killed
        pid = stale.name.split("-")[1]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    prefix = f".{target.name}-{os.getpid()}-"
    scratch = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    try:
        folders = {name: scratch / name for name in MODEL_NAMES}
        for folder in folders.values():
            folder.mkdir()
        train_demo_models(folders, on_step)
        (scratch / "demo-config.json").write_text(json.dumps(DEMO_CONFIG, indent=2))
        if target.exists():  # --force, or another process got there first
            shutil.rmtree(target)
        os.rename(scratch, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def build_demo_models(
    root: Path, force: bool = False, on_step: Callable[[str, int, int], None] | None = None
) -> dict[str, Path]:
    """The demo models under ``root/models`` (copied from the shared cache, trained there first if
    needed; ``force`` trains them again), and the task files under ``root/tasks``; returns name →
    folder. A change of ``DEMO_CONFIG`` makes a new cache entry, so the models are retrained."""
    _quiet_transformers()
    folders = {name: root / "models" / name for name in MODEL_NAMES}
    stamp = root / "models" / f".trained-{_cache_key()}"
    if (
        force
        or not stamp.is_file()
        or not all((f / "config.json").is_file() for f in folders.values())
    ):
        trained = _train_into_cache(force, on_step)
        for name, folder in folders.items():
            if folder.exists():
                shutil.rmtree(folder)
            shutil.copytree(trained / name, folder)
        for old in (root / "models").glob(".trained-*"):
            old.unlink()
        stamp.write_text(json.dumps(DEMO_CONFIG, indent=2))
    tasks = root / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    for task in TASKS:
        (tasks / f"{task}.jsonl").write_text(task_file_text(task), encoding="utf-8")
    return folders
