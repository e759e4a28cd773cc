#!/usr/bin/env python3
"""Benchmark a sweep's trials: where they merge (memory or disk) and how many run at once.

Builds a base Llama model of a chosen size (random weights, the demo's character tokenizer) and
two fine-tunes of it (base + noise), then runs the same grid sweep over the fine-tunes' weights
with ``scratch = "memory"``, ``scratch = "disk"`` and, if asked, with two workers, each through the
CLI under ``/usr/bin/time``. Prints wall time, peak RSS, and the mean merge and scoring seconds per
trial from ``trials.jsonl``.

    python bench/bench_sweep.py --hidden 2048 --layers 4 --trials 4 --workers 1 2
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def build_models(folder: Path, hidden: int, layers: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mergetui.demo import VOCAB, save_char_tokenizer

    if (folder / "ft-b" / "config.json").is_file():
        return
    config = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 128),
        num_key_value_heads=max(1, hidden // 128),
        max_position_embeddings=256,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).to(torch.bfloat16)
    for name, scale in (("base", 0.0), ("ft-a", 0.01), ("ft-b", 0.01)):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
        with torch.no_grad():
            for value, original in zip(
                model.state_dict().values(), base.state_dict().values(), strict=True
            ):
                value.copy_(original + scale * torch.randn_like(original))
        model.save_pretrained(folder / name)
        save_char_tokenizer(folder / name)


def write_sweep(folder: Path, trials: int, scratch: str, workers: int, rows: int) -> Path:
    from mergetui.demo import task_file_text

    task = folder / "math.jsonl"
    task.write_text("".join(task_file_text("math").splitlines(keepends=True)[:rows]))
    (folder / "recipe.toml").write_text(
        'version = 1\n[merge]\nmethod = "task_arithmetic"\nbase = "./base"\ndevice = "cpu"\n'
        '[[models]]\nmodel = "./ft-a"\nweight = 1.0\n[[models]]\nmodel = "./ft-b"\nweight = 1.0\n'
        '[output]\npath = "./merged"\n'
    )
    weights = ", ".join(f"{0.2 + 0.8 * i / max(1, trials - 1):.3f}" for i in range(trials))
    name = f"sweep-{scratch}-{workers}"
    path = folder / f"{name}.toml"
    path.write_text(
        f'version = 1\nrecipe = "recipe.toml"\n[sweep]\nstrategy = "grid"\nworkers = {workers}\n'
        f'scratch = "{scratch}"\noutput = "./{name}"\nkeep = 1\n'
        '[sweep.objective]\ntasks = { math = "math.jsonl" }\nscore = "mean_accuracy"\n'
        f'[sweep.space]\n"models[0].weight" = [{weights}]\n'
    )
    shutil.rmtree(folder / name, ignore_errors=True)
    return path


def run(path: Path) -> dict[str, float]:
    started = time.perf_counter()
    done = subprocess.run(
        ["/usr/bin/time", "-f", "maxrss %M", sys.executable, "-m", "mergetui", "sweep", str(path)]
        + ["--no-plot"],
        capture_output=True,
        text=True,
        cwd=path.parent,
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(done.stdout + done.stderr)
    rss = int(re.findall(r"maxrss (\d+)", done.stderr)[-1]) / 1024
    out = path.parent / path.stem
    rows = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    return {
        "wall_s": wall,
        "rss_mib": rss,
        "merge_s": statistics.mean(r["merge_s"] for r in rows),
        "eval_s": statistics.mean(r["eval_s"] for r in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", type=Path, default=Path("/tmp/mergetui-bench-sweep"))
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--rows", type=int, default=10, help="task rows scored per trial")
    parser.add_argument("--workers", type=int, nargs="+", default=[1])
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    build_models(args.folder, args.hidden, args.layers)
    size = sum(p.stat().st_size for p in (args.folder / "base").glob("*.safetensors"))
    print(f"models: {size / 2**20:.0f} MiB each (bf16), {args.trials} trials, {args.rows} rows")
    print(f"{'scratch':8} {'workers':>7} {'wall s':>8} {'RSS MiB':>8} {'merge s':>8} {'eval s':>8}")
    for workers in args.workers:
        for scratch in ("memory", "disk"):
            figures = run(write_sweep(args.folder, args.trials, scratch, workers, args.rows))
            print(
                f"{scratch:8} {workers:>7} {figures['wall_s']:>8.1f} {figures['rss_mib']:>8.0f} "
                f"{figures['merge_s']:>8.2f} {figures['eval_s']:>8.2f}"
            )


if __name__ == "__main__":
    main()
