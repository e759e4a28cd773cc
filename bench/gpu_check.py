#!/usr/bin/env python3
"""The GPU path, checked in one short run on a machine with a CUDA GPU (and dry-run on the CPU).

mergetui's users merge on GPU servers; CI has no GPU. This script is what a session with a lent
GPU runs (through ``bench/gpu_check.sh``), and what anyone can run on their own GPU server:

1. the test suite's CUDA-marked tests (``tests/test_cuda.py``);
2. the bench models (``bench_merge.py``'s generator) merged with every method on DEVICE and on the
   CPU, float32 output: the randomised methods bit-identical, the others within 1e-5 relative;
3. each merge's peak VRAM (its ``done`` event) against the plan's estimate; linear, ties and
   dare_ties again under a budget that puts the embedding and lm_head in blocks of rows: the
   same bits as whole on DEVICE, and peak VRAM within the budget;
4. the real ``nvidia-smi`` output the run screen parses, saved, and parsed by ``mergetui.gpus``;
5. the TUI's run step, headless (Pilot), on a DEVICE merge: the VRAM meter names the merge's GPU;
6. the ties and linear merges timed against the I/O floor (warm page cache);
7. with ``--budget-size 256k-vocab``: the 256K-vocabulary bench models (embedding and lm_head
   256000 × 2048) merged on DEVICE under the *default* budget (1 GiB): peak VRAM within it, the
   bits of the same merge on the CPU, and the wall time against the I/O floor. The reads go
   through pinned host buffers that overlap the copies to the GPU
   (:class:`mergetui.sources.checkpoint.Staging`).

``--device cpu`` is the dry run: every step runs, with the CPU standing in for the GPU, so the
script cannot fail on the GPU machine for a silly reason. One line per check (PASS, FAIL or INFO
with its figures) and ``OUT/gpu_check.json``; the exit code is 1 if any check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for folder in (ROOT, HERE, ROOT / "tests"):
    sys.path.insert(0, str(folder))

import torch  # noqa: E402
from bench_merge import SIZES, MergeJob, ensure_models, measure_floor  # noqa: E402
from conftest import method_recipe  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from mergetui.engine.blocks import MIN_WORKING_BYTES, minimum_budget  # noqa: E402
from mergetui.engine.executor import run_merge  # noqa: E402
from mergetui.engine.plan import build_plan  # noqa: E402
from mergetui.events import Event, ProgressEvent  # noqa: E402
from mergetui.gpus import QUERY, parse_nvidia_smi  # noqa: E402
from mergetui.methods.registry import METHODS  # noqa: E402
from mergetui.recipe import parse_recipe  # noqa: E402
from mergetui.units import format_bytes  # noqa: E402

RESULTS: list[dict[str, Any]] = []


def report(name: str, status: str, detail: str, **figures: Any) -> None:
    RESULTS.append({"check": name, "status": status, "detail": detail, **figures})
    print(f"{status:4s}  {name}: {detail}", flush=True)


def cuda_tests(device: str, out: Path) -> None:
    env = {**os.environ, "MERGETUI_CHECK_DEVICE": device, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "-rs"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    (out / "cuda-tests.log").write_text(done.stdout + done.stderr)
    summary = (done.stdout.strip().splitlines() or ["no output"])[-1]
    report("CUDA-marked tests", "PASS" if done.returncode == 0 else "FAIL", summary)


def merge(recipe_text: str, workdir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One in-process merge: its tensors, and its figures (time, peak VRAM, the estimate)."""
    plan = build_plan(parse_recipe(recipe_text, base_dir=workdir))
    estimate = plan.estimates.peak_vram_bytes if plan.estimates else None
    if plan.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(plan.device)
    events: list[Event] = []
    result = run_merge(plan, force=True, on_event=events.append)
    last = [e for e in events if isinstance(e, ProgressEvent)][-1]
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(result.output_dir.glob("*.safetensors")):
        tensors.update(load_file(file))
    figures = {
        "elapsed_s": round(result.elapsed_s, 3),
        "bytes_read": result.bytes_read,
        "bytes_written": result.bytes_written,
        "gpu_peak_bytes": last.gpu_peak_bytes,
        "vram_estimate_bytes": estimate,
        "output": str(result.output_dir),
    }
    return tensors, figures


def worst_relative_error(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    worst = 0.0
    for name, reference in expected.items():
        scale = float(reference.abs().max()) or 1.0
        worst = max(worst, float((got[name] - reference).abs().max()) / scale)
    return worst


def methods_on_device(device: str, models: Any, workdir: Path) -> dict[str, dict[str, Any]]:
    timings = {}
    for method, spec in METHODS.items():
        inputs = models.finetunes
        cpu_text = method_recipe(method, models.base, inputs, workdir / f"{method}-cpu")
        dev_text = method_recipe(
            method, models.base, inputs, workdir / f"{method}-dev", device=device
        )
        try:
            expected, _ = merge(cpu_text, workdir)
            got, figures = merge(dev_text, workdir)
        except Exception as exc:  # one broken method must not hide the others' results
            report(f"{method} on {device}", "FAIL", f"{type(exc).__name__}: {exc}")
            continue
        timings[method] = figures
        if got.keys() != expected.keys():
            report(f"{method} on {device}", "FAIL", "the tensor names differ from the CPU's")
            continue
        if spec.randomized:
            same = all(torch.equal(got[n], expected[n]) for n in expected)
            verdict = "bit-identical to the CPU" if same else "DIFFERS from the CPU"
            report(f"{method} on {device}", "PASS" if same else "FAIL", verdict, **figures)
        else:
            error = worst_relative_error(got, expected)
            report(
                f"{method} on {device}",
                "PASS" if error <= 1e-5 else "FAIL",
                f"worst relative difference from the CPU {error:.2e} (limit 1e-5), "
                f"{figures['elapsed_s']} s",
                relative_error=error,
                **figures,
            )
        peak, estimate = figures["gpu_peak_bytes"], figures["vram_estimate_bytes"]
        if device.startswith("cuda"):
            within = peak is not None and estimate is not None and peak <= estimate
            report(
                f"{method} peak VRAM",
                "PASS" if within else "FAIL",
                f"measured {format_bytes(peak or 0)}, estimated {format_bytes(estimate or 0)}"
                + (f" ({peak / estimate:.0%} of the estimate)" if peak and estimate else ""),
            )
        shutil.rmtree(workdir / f"{method}-cpu", ignore_errors=True)
    return timings


#: The methods checked in blocks: one of each kind of block kernel.
BLOCKED_METHODS = ("linear", "ties", "dare_ties")


def blocked_on_device(device: str, models: Any, workdir: Path) -> None:
    """A budget small enough to put the embedding and lm_head in blocks of rows: the merge on
    DEVICE must give the bits of the same merge done whole on DEVICE, and its peak VRAM must stay
    within the budget."""
    for method in BLOCKED_METHODS:
        whole_text = method_recipe(
            method, models.base, models.finetunes, workdir / f"{method}-whole", device=device
        )
        whole, _ = merge(whole_text, workdir)
        plan = build_plan(parse_recipe(whole_text, base_dir=workdir))
        embed = next(t for t in plan.tensors if t.merge and len(t.shape) == 2 and t.shape[0] > 1000)
        working = embed.numel * 4 * len(embed.reads) // 3  # a third of the embedding's inputs
        budget = minimum_budget() - MIN_WORKING_BYTES + working
        blocked_text = whole_text.replace(
            f'device = "{device}"', f'device = "{device}"\nmax_memory = {budget}'
        ).replace(f"{method}-whole", f"{method}-blocked")
        got, figures = merge(blocked_text, workdir)
        same = got.keys() == whole.keys() and all(torch.equal(got[n], whole[n]) for n in whole)
        report(
            f"{method} in blocks on {device}",
            "PASS" if same else "FAIL",
            "bit-identical to whole" if same else "DIFFERS from whole",
            budget_bytes=budget,
            **figures,
        )
        if device.startswith("cuda"):
            peak = figures["gpu_peak_bytes"] or 0
            report(
                f"{method} in blocks: peak VRAM",
                "PASS" if peak <= budget else "FAIL",
                f"measured {format_bytes(peak)}, budget {format_bytes(budget)}",
            )
        for folder in (f"{method}-whole", f"{method}-blocked"):
            shutil.rmtree(workdir / folder, ignore_errors=True)


#: The methods merged under the default budget on the large-vocabulary models.
DEFAULT_BUDGET_METHODS = ("linear", "ties")


def default_budget_on_device(device: str, size: str, workdir: Path) -> None:
    """The models of ``size`` merged under the default budget on DEVICE and on the CPU: the same
    bits (bf16 output, as users merge), the device's peak VRAM within the budget, and the wall
    time against the I/O floor of the same inputs (warm page cache)."""
    from mergetui.engine.blocks import DEFAULT_MAX_MEMORY

    folder = workdir / f"budget-{size}"
    models = ensure_models(folder / "models", SIZES[size], 3, 0, 0.01, 2)
    for method in DEFAULT_BUDGET_METHODS:
        texts = {
            where: method_recipe(
                method,
                models.base,
                models.finetunes,
                folder / f"{method}-{where}",
                device=where,
                dtype="bfloat16",
            )
            for where in ("cpu", device)
        }
        plan = build_plan(parse_recipe(texts[device], base_dir=folder))
        assert plan.memory is not None
        on_device, figures = merge(texts[device], folder)
        on_cpu, _ = merge(texts["cpu"], folder)
        if on_device.keys() != on_cpu.keys():
            report(
                f"{method}, {size} on {device}", "FAIL", "the tensor names differ from the CPU's"
            )
            continue
        if spec_is_exact(method):
            ok = all(torch.equal(on_device[n], on_cpu[n]) for n in on_cpu)
            verdict = "bit-identical to the CPU" if ok else "DIFFERS from the CPU"
        else:  # one bf16 step of the largest value: 2**-8 relative
            error = worst_relative_error(on_device, on_cpu)
            ok = error <= 2**-8
            verdict = f"worst relative difference from the CPU {error:.2e} (limit 2**-8, bf16)"
        report(
            f"{method}, {size}, default budget on {device}",
            "PASS" if ok else "FAIL",
            f"{verdict}; {plan.memory.summary()}",
            **figures,
        )
        if device.startswith("cuda"):
            peak = figures["gpu_peak_bytes"] or 0
            report(
                f"{method}, {size}: peak VRAM",
                "PASS" if peak <= DEFAULT_MAX_MEMORY else "FAIL",
                f"measured {format_bytes(peak)}, budget {format_bytes(DEFAULT_MAX_MEMORY)}",
            )
        inputs = MergeJob(method, models.base, models.finetunes, folder).input_files()
        floor = measure_floor(inputs, figures["bytes_written"], folder / "floor", "warm", 2)
        report(
            f"{method}, {size} on {device} against the I/O floor",
            "INFO",
            f"merge {figures['elapsed_s']:.2f} s, floor {floor.total_s:.2f} s: "
            f"{figures['elapsed_s'] / floor.total_s:.2f}× the floor",
            floor_s=floor.total_s,
        )
        for where in ("cpu", device):
            shutil.rmtree(folder / f"{method}-{where}", ignore_errors=True)


def spec_is_exact(method: str) -> bool:
    """Whether a method must give the CPU's bits on any device: the element-wise ones (and the
    random ones, whose counter-based streams give the CPU's bits on any device); others sum in a
    device's own order."""
    return method in {"linear", "task_arithmetic", "passthrough"} or bool(
        METHODS[method].randomized
    )


def nvidia_smi(out: Path) -> None:
    program = shutil.which("nvidia-smi")
    sample = "0, NVIDIA H200, 1024, 143771, 3\n"
    if program is None:
        readings = parse_nvidia_smi(sample)
        ok = len(readings) == 1 and readings[0].total_bytes == 143771 * 1024**2
        report("nvidia-smi", "PASS" if ok else "FAIL", "none here; the parser read a sample row")
        return
    query = [program, f"--query-gpu={QUERY}", "--format=csv,noheader,nounits"]
    raw = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout
    (out / "nvidia-smi-query.csv").write_text(raw)
    full = subprocess.run([program], capture_output=True, text=True, timeout=30).stdout
    (out / "nvidia-smi.txt").write_text(full)
    readings = parse_nvidia_smi(raw)
    ok = bool(readings) and all(g.total_bytes > 0 and g.name for g in readings)
    shown = "; ".join(
        f"GPU {g.index} {g.name} {format_bytes(g.used_bytes)}/{format_bytes(g.total_bytes)} "
        f"{g.utilization_percent}%"
        for g in readings
    )
    report("nvidia-smi parsed", "PASS" if ok else "FAIL", shown or f"nothing parsed from {raw!r}")


async def _watch_run_step(recipe_text: str, workdir: Path) -> tuple[str, str]:
    from textual.widgets import Static

    from mergetui.tui.app import create_app
    from mergetui.tui.screens.run import RunScreen
    from mergetui.tui.state import RecipeDraft

    draft = RecipeDraft.from_recipe(parse_recipe(recipe_text, base_dir=workdir))
    app = create_app(draft=draft)
    async with app.run_test(size=(120, 40)) as pilot:
        app.action_run()
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, RunScreen)
        deadline = time.monotonic() + 600
        while screen.outcome in ("starting", "running") and time.monotonic() < deadline:
            await pilot.pause(0.2)
        await pilot.pause(1.2)  # one more GPU sample after the end
        return screen.outcome, str(screen.query_one("#vram", Static).render())


def run_step(device: str, models: Any, workdir: Path) -> None:
    text = method_recipe(
        "ties", models.base, models.finetunes, workdir / "tui-merge", device=device
    )
    outcome, vram = asyncio.run(_watch_run_step(text, workdir))
    if device.startswith("cuda"):
        ok = outcome == "done" and "GPU" in vram and "this merge holds" in vram
        if shutil.which("nvidia-smi"):
            ok = ok and "← the merge" in vram
    else:
        ok = outcome == "done" and "no GPU in use" in vram
    report("TUI run step", "PASS" if ok else "FAIL", f"{outcome}; VRAM meter: {vram!r}")


def io_floor(models: Any, timings: dict[str, dict[str, Any]], workdir: Path) -> None:
    for method in ("ties", "linear"):
        figures = timings.get(method)
        if figures is None:
            continue
        inputs = MergeJob(method, models.base, models.finetunes, workdir).input_files()
        floor = measure_floor(inputs, figures["bytes_written"], workdir / "floor", "warm", 2)
        ratio = figures["elapsed_s"] / floor.total_s if floor.total_s else float("nan")
        report(
            f"{method} against the I/O floor",
            "INFO",
            f"merge {figures['elapsed_s']:.2f} s, floor {floor.total_s:.2f} s "
            f"(read {format_bytes(floor.input_bytes)} in {floor.read_s:.2f} s, write "
            f"{format_bytes(floor.output_bytes)} in {floor.write_s:.2f} s): {ratio:.2f}× the floor",
            ratio=ratio,
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu for the dry run")
    parser.add_argument("--size", default="60M", choices=list(SIZES), help="bench model size")
    parser.add_argument(
        "--budget-size",
        choices=list(SIZES),
        help="also merge models of this size under the default budget (e.g. 256k-vocab)",
    )
    parser.add_argument("--out", type=Path, default=HERE / "out" / "gpu-check", help="results")
    parser.add_argument("--workdir", type=Path, default=HERE / "out", help="models and merges")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MERGETUI_LOG_DIR", str(args.out / "state"))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])
    )
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        report("CUDA", "FAIL", "torch sees no CUDA device; run with --device cpu for the dry run")
    else:
        where = torch.cuda.get_device_name(args.device) if args.device != "cpu" else "the CPU"
        print(f"device {args.device}: {where}; torch {torch.__version__}", flush=True)
        cuda_tests(args.device, args.out)
        workdir = args.workdir / f"gpu-check-{args.size}"
        models = ensure_models(workdir / "models", SIZES[args.size], 3, 0, 0.01, 2)
        timings = methods_on_device(args.device, models, workdir)
        blocked_on_device(args.device, models, workdir)
        nvidia_smi(args.out)
        run_step(args.device, models, workdir)
        io_floor(models, timings, workdir)
        if args.budget_size:
            default_budget_on_device(args.device, args.budget_size, args.workdir)
    (args.out / "gpu_check.json").write_text(json.dumps(RESULTS, indent=2))
    failed = [r["check"] for r in RESULTS if r["status"] == "FAIL"]
    print(
        f"{len(RESULTS)} checks, {len(failed)} failed"
        + (f": {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
