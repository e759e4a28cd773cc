#!/usr/bin/env python3
"""LoRA extraction: ``mergetui lora extract`` against ``mergekit-extract-lora``, wall time and peak RSS.

Uses (or generates) bench_merge.py's synthetic Llama-style checkpoints, a base and one fine-tune
(base + dense noise: every singular value matters, the worst case for a low rank), and extracts a
rank-R adapter (default 64) from them with each tool under ``/usr/bin/time -v``. Then prints wall
time, peak RSS and adapter size per tool, and with ``--compare`` each LoRA module's reconstruction
error ‖ΔW − B·A‖/‖ΔW‖ from both adapters (they should agree: same SVD, same rank).

    python bench/bench_lora_extract.py [--size 500M] [--rank 64] [--device cpu]
        [--mergekit-venv /tmp/mk-venv] [--compare] [--workdir /tmp/bench500]

The models are reused from ``WORKDIR/models/SIZE-L<layers>/{base,ft1}`` when bench_merge.py made
them with the same settings (default workdir: /tmp/bench500 if it holds them, else bench/out).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_merge import MIB, SIZES, ensure_models, safetensors_files, tool_env  # noqa: E402


def timed(command: list[str], log: Path) -> dict[str, Any]:
    """Run ``command`` under GNU time; its wall seconds, peak RSS (MiB) and exit code."""
    report = log.with_suffix(".time")
    started = time.perf_counter()
    with log.open("w") as handle:
        handle.write("$ " + shlex.join(command) + "\n")
        handle.flush()
        done = subprocess.run(
            ["/usr/bin/time", "-v", "-o", str(report), *command],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=tool_env(),
            check=False,
        )
    wall = time.perf_counter() - started
    text = report.read_text() if report.is_file() else ""
    rss = re.search(r"Maximum resident set size \(kbytes\):\s*(\d+)", text)
    return {
        "wall_s": round(wall, 2),
        "peak_rss_mib": round(int(rss.group(1)) / 1024, 1) if rss else None,
        "exit_code": done.returncode,
        "log": str(log),
    }


def adapter_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("adapter_model.*")) if folder.is_dir() else 0


def reconstruction_errors(adapter: Path, base: Path, model: Path) -> dict[str, float]:
    """‖ΔW − B·A‖_F / ‖ΔW‖_F for every LoRA module of ``adapter`` (float64)."""
    from safetensors import safe_open

    def tensors(folder: Path) -> dict[str, Any]:
        handles = [safe_open(str(f), framework="pt") for f in safetensors_files(folder)]
        return {name: handle for handle in handles for name in handle.keys()}  # noqa: SIM118

    base_t, model_t = tensors(base), tensors(model)
    errors = {}
    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as lora:
        for name in lora.keys():  # noqa: SIM118
            if not name.endswith(".lora_A.weight"):
                continue
            module = name.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            weight = f"{module}.weight"
            delta = (
                model_t[weight].get_tensor(weight).double()
                - base_t[weight].get_tensor(weight).double()
            )
            a = lora.get_tensor(name).double()
            b = lora.get_tensor(name.replace("lora_A", "lora_B")).double()
            errors[module] = float((delta - b @ a).norm() / delta.norm())
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=list(SIZES), default="500M", help="model size preset")
    parser.add_argument("--rank", type=int, default=64, help="LoRA rank (default 64)")
    parser.add_argument("--device", default="cpu", help="mergetui --device (and mergekit's)")
    parser.add_argument("--workdir", type=Path, help="models and outputs (see above)")
    parser.add_argument(
        "--mergetui-cmd", default=f"{sys.executable} -m mergetui", help="how to run mergetui"
    )
    parser.add_argument(
        "--mergekit-venv", type=Path, help="a venv with mergekit 0.1.5 (mergekit-extract-lora)"
    )
    parser.add_argument("--compare", action="store_true", help="compare reconstruction errors")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    shape = SIZES[args.size]
    tag = f"{args.size}-L{shape.layers}"
    workdir = args.workdir
    if workdir is None:
        lead = Path("/tmp/bench500")
        workdir = lead if (lead / "models" / tag / "ft1").is_dir() else HERE / "out"
    workdir = workdir.resolve()
    print(f"models: {workdir / 'models' / tag}", flush=True)
    models = ensure_models(workdir / "models" / tag, shape, 1, seed=0, delta_scale=0.01, shards=3)
    base, model = models.base, models.finetunes[0]
    size = sum(f.stat().st_size for f in safetensors_files(model))
    print(f"  {size / MIB:.0f} MiB per model; rank {args.rank} on {args.device}", flush=True)

    runs = workdir / "lora-extract" / tag
    runs.mkdir(parents=True, exist_ok=True)
    tools: dict[str, list[str]] = {
        "mergetui": [
            *shlex.split(args.mergetui_cmd),
            "lora",
            "extract",
            str(model),
            "--base",
            str(base),
            "--rank",
            str(args.rank),
            "--device",
            args.device,
            "-o",
            str(runs / "mergetui"),
            "--force",
            "--json",
        ]
    }
    if args.mergekit_venv is not None:
        script = args.mergekit_venv / "bin" / "mergekit-extract-lora"
        if not script.is_file():
            raise SystemExit(f"{script} does not exist")
        tools["mergekit"] = [
            str(script),
            "--model",
            str(model),
            "--base-model",
            str(base),
            "--out-path",
            str(runs / "mergekit"),
            "--max-rank",
            str(args.rank),
            "--device",
            args.device,
        ]
    results: dict[str, dict[str, Any]] = {}
    for tool, command in tools.items():
        shutil.rmtree(runs / tool, ignore_errors=True)  # mergekit writes into an existing folder
        print(f"running {tool} …", flush=True)
        result = timed(command, runs / f"{tool}.log")
        result["adapter_bytes"] = adapter_size(runs / tool)
        results[tool] = result
        if result["exit_code"]:
            print(f"  {tool} failed (exit {result['exit_code']}); see {result['log']}")

    print(f"\n{'tool':10s} {'wall s':>8s} {'peak RSS MiB':>13s} {'adapter MiB':>12s}")
    for tool, result in results.items():
        rss = result["peak_rss_mib"]
        print(
            f"{tool:10s} {result['wall_s']:8.1f} {rss if rss is not None else '?':>13} "
            f"{result['adapter_bytes'] / MIB:12.1f}"
        )
    ok = [t for t, r in results.items() if r["exit_code"] == 0]
    if args.compare and ok:
        errors = {tool: reconstruction_errors(runs / tool, base, model) for tool in ok}
        for tool, found in errors.items():
            values = list(found.values())
            print(
                f"{tool}: {len(values)} LoRA modules, reconstruction error "
                f"{min(values):.4f} to {max(values):.4f}"
            )
        if len(errors) == 2:
            ours, theirs = errors["mergetui"], errors["mergekit"]
            same = ours.keys() == theirs.keys()
            worst = max((abs(ours[m] - theirs[m]) / theirs[m] for m in theirs), default=0.0)
            print(f"same modules: {same}; max relative difference of the errors: {worst:.2e}")
            results["comparison"] = {"same_modules": same, "max_rel_diff": worst}
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if len(ok) == len(tools) else 1


if __name__ == "__main__":
    sys.exit(main())
