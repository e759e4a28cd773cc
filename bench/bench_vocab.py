#!/usr/bin/env python3
"""What aligning vocabularies costs: mergetui against mergekit on a Llama-3-sized vocabulary.

Builds a base with a 128,256-token word-level tokenizer (Llama 3's vocabulary size) and an
embedding and head of that many rows, one small layer, and two fine-tunes that each added tokens
(special chat tokens in one, plain ones in the other) and resized their embeddings. Then merges the
three with TIES four ways and prints wall time and peak RSS (``/usr/bin/time -v``):

- ``same``: three models that share the base's tokenizer (nothing to align), as a floor;
- ``base``, ``union``: the fine-tunes with added tokens, aligned to the base's vocabulary or to the
  union, and to the union with ``missing_tokens = "base_mean"`` and padding rows (two whole-table
  means, each a reading pass of its own when the tensor goes in blocks);
- with ``--mergekit-venv``, mergekit's ``tokenizer_source: union`` on the same inputs.

It also prints how long the plan takes (reading three tokenizers of 128k tokens, no weight).

    python bench/bench_vocab.py [--hidden 1024] [--mergekit-venv /tmp/mk-venv]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

VOCAB = 128_256


def save_model(
    directory: Path,
    hidden: int,
    tokens: list[str],
    seed: int,
    added: Sequence[str] = (),
    special: Sequence[str] = (),
) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="</s>")
    if special:
        tokenizer.add_tokens(list(special), special_tokens=True)
    if added:
        tokenizer.add_tokens(list(added))
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden,
        num_hidden_layers=1,
        num_attention_heads=8,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    )
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def timed(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of ``command``, from /usr/bin/time -v."""
    started = time.perf_counter()
    result = subprocess.run(
        ["/usr/bin/time", "-v", *command], capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - started
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)
    return wall, int(rss.group(1)) / 1024 if rss else float("nan")


def recipe(folder: Path, models: list[str], tokenizer: str, out: str, extra: str = "") -> Path:
    """A TIES recipe of ``models`` onto ./base with ``tokenizer``; ``extra``: more [merge] lines."""
    entries = "".join(f'[[models]]\nmodel = "{m}"\nweight = 1.0\n' for m in models)
    path = folder / f"{out}.toml"
    path.write_text(
        f'version = 2\n[merge]\nmethod = "ties"\nbase = "./base"\ntokenizer = "{tokenizer}"\n'
        f'device = "cpu"\n{extra}[merge.parameters]\ndensity = 0.5\n{entries}'
        f'[output]\npath = "./{out}"\n'
    )
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--mergekit-venv", type=Path)
    parser.add_argument("--keep", type=Path, help="build the models here and keep them")
    args = parser.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="mergetui-vocab-"))
    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["<unk>", "</s>"] + [f"w{i}" for i in range(VOCAB - 2)]
    if not (folder / "base" / "model.safetensors").is_file():
        save_model(folder / "base", args.hidden, tokens, 0)
        save_model(folder / "same-a", args.hidden, tokens, 1)
        save_model(folder / "same-b", args.hidden, tokens, 2)
        chat = [f"<|chat_{i}|>" for i in range(8)]
        save_model(folder / "chat", args.hidden, tokens, 3, special=chat)
        save_model(folder / "domain", args.hidden, tokens, 4, added=[f"term{i}" for i in range(8)])
    mergetui = [sys.executable, "-m", "mergetui"]
    from mergetui.engine.plan import build_plan
    from mergetui.recipe import load_recipe

    rows = []
    plan_recipe = recipe(folder, ["./chat", "./domain"], "union", "plan-only")
    started = time.perf_counter()
    build_plan(load_recipe(plan_recipe), device="cpu").close()
    plan_s = time.perf_counter() - started
    for name, models, tokenizer, extra in (
        ("same (nothing to align)", ["./same-a", "./same-b"], "base", ""),
        ("tokenizer = base", ["./chat", "./domain"], "base", ""),
        ("tokenizer = union", ["./chat", "./domain"], "union", ""),
        # padding rows and the base's mean row: two passes first for the means
        (
            "union, base_mean, pad_to_multiple_of = 64",
            ["./chat", "./domain"],
            "union",
            'missing_tokens = "base_mean"\npad_to_multiple_of = 64\n',
        ),
    ):
        out = re.sub(r"\W+", "-", name).strip("-")
        path = recipe(folder, models, tokenizer, out, extra)
        wall, rss = timed([*mergetui, "run", str(path), "--force", "--json"])
        rows.append((f"mergetui, {name}", wall, rss))
    if args.mergekit_venv:
        config = folder / "mk.yaml"
        config.write_text(
            "merge_method: ties\nbase_model: ./base\ntokenizer_source: union\ndtype: bfloat16\n"
            "parameters: {density: 0.5}\nmodels:\n"
            "  - model: ./chat\n    parameters: {weight: 1.0}\n"
            "  - model: ./domain\n    parameters: {weight: 1.0}\n"
        )
        shutil.rmtree(folder / "mk-out", ignore_errors=True)
        command = [str(args.mergekit_venv / "bin" / "mergekit-yaml"), "mk.yaml", "mk-out"]
        started = time.perf_counter()
        result = subprocess.run(
            ["/usr/bin/time", "-v", *command], cwd=folder, capture_output=True, text=True
        )
        wall = time.perf_counter() - started
        found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)
        rss = int(found.group(1)) / 1024 if found and not result.returncode else float("nan")
        rows.append(("mergekit 0.1.5, tokenizer_source: union", wall, rss))
    print(f"vocabulary {VOCAB} tokens, hidden {args.hidden}, bf16; models in {folder}")
    print(f"plan (3 tokenizers read, no weight): {plan_s:.2f} s")
    print(f"{'run':<45} {'wall s':>8} {'peak RSS MiB':>13}")
    for name, wall, rss in rows:
        print(f"{name:<45} {wall:>8.2f} {rss:>13.0f}")
    print(json.dumps({"plan_s": plan_s, "runs": rows}))
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
