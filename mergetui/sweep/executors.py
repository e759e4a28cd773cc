"""Where a sweep's trials run: in this process, in local worker processes, or on a Ray cluster.

The three share one shape: ``parents()`` scores the parents once, ``run(jobs)`` runs a batch of
trials at once and yields each :class:`TrialOutcome` as it finishes, ``close()`` lets go of the
workers. The sweep's driver (:mod:`mergetui.sweep.runner`) asks for a batch of ``workers`` trials,
waits for all of them, and tells the search their results in trial order; so the same seed and
the same ``workers`` give the same trials here, in worker processes and on a cluster.

- :class:`InlineExecutor` (``workers = 1``): this process; a stop is seen between tensors.
- :class:`ProcessExecutor` (``workers > 1``): ``spawn``-started processes (a forked process would
  inherit torch's threads and locks); each keeps its imports for every trial it runs. Progress
  comes back through a queue; a stop is an event every worker watches. Workers ignore SIGINT: a
  Ctrl-C in the terminal reaches the whole process group, and the driver decides.
- :class:`RayExecutor` (``--ray ADDRESS``): each trial is a Ray task asking for the resources the
  plan estimates; before the first trial every node is asked whether it sees the models, the task
  files and the output folder (shared storage) and runs the same mergetui. Progress comes back
  through a small inbox actor; a stop cancels the tasks in flight.
"""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergetui.errors import MergeCancelled, MergeTuiError
from mergetui.pauses import ENV as PAUSE_ENV
from mergetui.pauses import RELEASE_ENV as PAUSE_RELEASE_ENV
from mergetui.sweep.spec import Sweep
from mergetui.sweep.work import (
    STOPPED,
    Report,
    TrialJob,
    TrialOutcome,
    TrialSizes,
    run_trial,
    score_parents,
)

#: progress from another process is sent at most this often per trial (a merge of a big model
#: reports every tensor)
REPORT_EVERY_S = 0.25


class _Throttled:
    """A :data:`Report` that passes a message on when its text changes, when it is done, or when
    :data:`REPORT_EVERY_S` passed since the last one of its trial."""

    def __init__(self, send: Any) -> None:
        self.send = send
        self.last: dict[int | None, tuple[str, float]] = {}

    def __call__(self, trial: int | None, what: str, fraction: float | None) -> None:
        now = time.monotonic()
        previous = self.last.get(trial)
        recent = previous and previous[0] == what and now - previous[1] < REPORT_EVERY_S
        if recent and (fraction is None or fraction < 1.0):
            return
        self.last[trial] = (what, now)
        self.send((trial, what, fraction))


class InlineExecutor:
    """One trial at a time, in this process."""

    workers = 1

    def __init__(self, sweep: Sweep, device: str, cancel: threading.Event, report: Report | None):
        self.sweep, self.device, self.cancel, self.report = sweep, device, cancel, report

    def parents(self) -> dict[str, dict[str, float]]:
        return score_parents(self.sweep, self.device, self.report)

    def run(self, jobs: list[TrialJob]) -> Iterator[TrialOutcome]:
        for job in jobs:
            yield run_trial(self.sweep, job, self.device, self.cancel, self.report)

    def close(self) -> None:
        pass


# --- local worker processes -------------------------------------------------------------------


@dataclass
class _WorkerState:
    """A worker process's side of the pool: where its progress goes, its stop event, its slot
    (which GPU it takes when there are several)."""

    messages: Any
    stop: threading.Event
    slot: int


_WORKER: _WorkerState | None = None


def _start_worker(messages: Any, stop: Any, counter: Any, threads: int) -> None:
    """Pool initializer: ignore Ctrl-C (the driver stops the sweep), take this worker's share of
    the cores, turn the shared stop event into the thread event the merge watches, take a slot
    number."""
    global _WORKER
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch

    # Every process would otherwise run one thread per core: two workers on two cores made
    # scoring 7x slower (OpenMP threads spinning against each other), not 2x faster.
    torch.set_num_threads(threads)
    with counter.get_lock():
        slot = counter.value
        counter.value += 1
    local = threading.Event()
    parent = os.getppid()

    def watch() -> None:
        # the driver's stop, or the driver gone (killed outright): a trial left running would
        # write into a folder the resumed sweep merges again
        while not stop.wait(1.0):
            if os.getppid() != parent:
                break
        local.set()

    threading.Thread(target=watch, daemon=True, name="mergetui-stop").start()
    _WORKER = _WorkerState(messages, local, slot)


def _worker_device(device: str, slot: int) -> str:
    """A bare ``cuda`` (or ``auto`` on a GPU machine) becomes ``cuda:<slot mod GPUs>``, so that
    workers spread over the GPUs; anything else is kept as asked."""
    if device not in ("cuda", "auto"):
        return device
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        return device
    return f"cuda:{slot % count}"


def _worker_report() -> Report:
    assert _WORKER is not None
    return _Throttled(_WORKER.messages.put)


def _worker_parents(sweep: Sweep, device: str) -> dict[str, dict[str, float]]:
    assert _WORKER is not None
    return score_parents(sweep, _worker_device(device, _WORKER.slot), _worker_report())


def _worker_trial(sweep: Sweep, job: TrialJob, device: str) -> TrialOutcome:
    assert _WORKER is not None
    device = _worker_device(device, _WORKER.slot)
    return run_trial(sweep, job, device, _WORKER.stop, _worker_report())


def _core_share(workers: int) -> int:
    """The CPU threads each of ``workers`` processes gets: the cores this process may use,
    shared out (at least one)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // workers)


class ProcessExecutor:
    """``workers`` trials at once in local processes started with ``spawn``."""

    def __init__(
        self,
        sweep: Sweep,
        device: str,
        cancel: threading.Event,
        report: Report | None,
        workers: int,
    ) -> None:
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self.sweep, self.device, self.cancel, self.report = sweep, device, cancel, report
        self.workers = workers
        self.messages: Any = context.Queue()
        self.stop: Any = context.Event()
        self.pool = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=context,
            initializer=_start_worker,
            initargs=(self.messages, self.stop, context.Value("i", 0), _core_share(workers)),
        )

    def _forward(self) -> None:
        """Pass on the progress the workers sent so far."""
        while True:
            try:
                message = self.messages.get_nowait()
            except queue.Empty:
                return
            if self.report is not None:
                self.report(*message)

    def _results(self, futures: list[Future[Any]]) -> Iterator[Any]:
        """Each result as it comes (a worker's error raised here, never dropped), the progress
        before it; the driver's stop passed to the workers, who see it between tensors."""
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=REPORT_EVERY_S, return_when=FIRST_COMPLETED)
            if self.cancel.is_set():
                self.stop.set()
            self._forward()
            for future in done:
                yield future.result()

    def parents(self) -> dict[str, dict[str, float]]:
        future = self.pool.submit(_worker_parents, self.sweep, self.device)
        result: dict[str, dict[str, float]] = next(self._results([future]))
        return result

    def run(self, jobs: list[TrialJob]) -> Iterator[TrialOutcome]:
        futures = [self.pool.submit(_worker_trial, self.sweep, job, self.device) for job in jobs]
        yield from self._results(futures)

    def close(self) -> None:
        self.stop.set()
        self.pool.shutdown(wait=True, cancel_futures=True)


# --- Ray ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrialResources:
    """What a trial asks the cluster for: CPUs, bytes of memory, GPUs."""

    cpus: float
    memory: int
    gpus: float

    def options(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "num_cpus": self.cpus,
            "memory": self.memory,
            "num_gpus": self.gpus,
        }
        # a test's pause point (mergetui.pauses) reaches the tasks too; nothing set, nothing sent
        pauses = {k: v for k, v in os.environ.items() if k in (PAUSE_ENV, PAUSE_RELEASE_ENV)}
        if pauses:
            options["runtime_env"] = {"env_vars": pauses}
        return options

    def describe(self) -> str:
        gpu = f", {self.gpus:g} GPU" if self.gpus else ""
        return f"{self.cpus:g} CPU, {self.memory / 2**30:.1f} GiB{gpu} per trial"


def trial_resources(sizes: TrialSizes, device: str) -> TrialResources:
    """The merge's peak memory estimate plus the merged model loaded for scoring; one GPU when
    the trials run on CUDA."""
    on_gpu = device.startswith("cuda")
    return TrialResources(
        cpus=1, memory=sizes.merge_peak_bytes + sizes.scoring_bytes, gpus=1 if on_gpu else 0
    )


def local_paths(sweep: Sweep) -> list[tuple[str, Path]]:
    """Every local path a trial reads or writes, with the key that names it: models, adapters,
    task files, and the output folder."""
    from mergetui.sources.refs import parse_ref

    recipe = sweep.recipe
    paths: list[tuple[str, Path]] = []
    keyed = [("merge.base", recipe.base)] if recipe.base else []
    keyed += [(f"models[{i}].model", entry.model) for i, entry in enumerate(recipe.models)]
    keyed += [(f"models[{i}].lora", e.lora) for i, e in enumerate(recipe.models) if e.lora]
    for number, piece in enumerate(recipe.slices):
        keyed += [(f"slices[{number}].base", piece.base)] if piece.base else []
        keyed += [(f"slices[{number}].sources[{i}]", s.model) for i, s in enumerate(piece.sources)]
    for key, text in keyed:
        ref = parse_ref(text, recipe.base_dir)
        if ref.local_path is not None:
            paths.append((key, ref.local_path.resolve()))
    paths += [(f"sweep.objective.tasks.{n}", p.resolve()) for n, p in sweep.objective.tasks.items()]
    return paths


def _probe_node(paths: list[tuple[str, str]], marker: str) -> dict[str, Any]:
    """Run on one node: which of ``paths`` it cannot see, whether it sees the driver's marker
    file in the output folder (the same storage, not a folder of the same name), its mergetui."""
    import socket

    import mergetui

    missing = [(key, path) for key, path in paths if not os.path.exists(path)]
    return {
        "host": socket.gethostname(),
        "missing": missing,
        "output_shared": os.path.exists(marker),
        "version": mergetui.__version__,
    }


class ProgressInbox:
    """A Ray actor holding the tasks' progress messages until the driver takes them. Tasks send
    without waiting (``inbox.put.remote(...)``, no ``ray.get``), so a trial never waits on a
    round trip to report progress (with ``ray.util.queue`` every report waited for the actor's
    answer)."""

    def __init__(self) -> None:
        self.messages: list[Any] = []

    def put(self, message: Any) -> None:
        self.messages.append(message)

    def take(self) -> list[Any]:
        taken, self.messages = self.messages, []
        return taken


def _sender(inbox: Any) -> Report | None:
    return None if inbox is None else _Throttled(lambda message: inbox.put.remote(message))


def _take_assigned_cores() -> None:
    """Run torch, and the merge's C loops that size their pool by torch's thread count, on the
    CPUs Ray gave this task: said explicitly rather than left to the ``OMP_NUM_THREADS`` Ray
    sets, as local workers take their share of the cores."""
    import ray
    import torch

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))


def _ray_parents(sweep: Sweep, device: str, inbox: Any) -> dict[str, dict[str, float]]:
    _take_assigned_cores()
    return score_parents(sweep, device, _sender(inbox))


def _ray_trial(sweep: Sweep, job: TrialJob, device: str, inbox: Any) -> TrialOutcome:
    _take_assigned_cores()
    return run_trial(sweep, job, device, None, _sender(inbox))


class RayExecutor:
    """Trials as Ray tasks on an existing cluster (``address``: ``auto``, ``HOST:PORT`` or
    ``ray://HOST:PORT``)."""

    def __init__(
        self,
        sweep: Sweep,
        device: str,
        cancel: threading.Event,
        report: Report | None,
        workers: int,
        address: str,
        sizes: TrialSizes,
    ) -> None:
        try:
            import ray
        except ImportError as exc:
            raise MergeTuiError(
                "--ray needs Ray on this machine and on the cluster: pip install 'mergetui[ray]'"
            ) from exc
        self.sweep, self.device, self.cancel, self.report = sweep, device, cancel, report
        self.workers = workers
        self.ray = ray
        try:
            ray.init(
                address=address,
                logging_level="WARNING",
                log_to_driver=False,
                configure_logging=True,
            )
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise MergeTuiError(
                f"sweep.ray: cannot reach a Ray cluster at {address!r} ({exc}); start one with "
                "`ray start --head` or give its address (HOST:PORT)"
            ) from exc
        if device == "auto" and ray.cluster_resources().get("GPU", 0) > 0:
            self.device = device = "cuda"  # the nodes have GPUs: each trial takes one
        self.resources = trial_resources(sizes, device)
        self.nodes = self._check_nodes()
        inbox = ray.remote(num_cpus=0)(ProgressInbox)
        self.messages = inbox.remote() if report else None

    def _check_nodes(self) -> int:
        """Ask every live node whether it can run a trial; every problem named, before any."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        import mergetui

        ray = self.ray
        out = self.sweep.output
        out.mkdir(parents=True, exist_ok=True)
        marker = out / f".mergetui-shared-{uuid.uuid4().hex}"
        marker.write_text("written by the sweep's driver to check the storage is shared\n")
        paths = [(key, str(path)) for key, path in local_paths(self.sweep)]
        probe = ray.remote(num_cpus=0)(_probe_node)
        nodes = [node for node in ray.nodes() if node.get("Alive")]
        try:
            answers = ray.get(
                [
                    probe.options(
                        scheduling_strategy=NodeAffinitySchedulingStrategy(
                            node["NodeID"], soft=False
                        )
                    ).remote(paths, str(marker))
                    for node in nodes
                ]
            )
        finally:
            marker.unlink(missing_ok=True)
        problems = []
        for node, answer in zip(nodes, answers, strict=True):
            where = f"node {node.get('NodeManagerAddress')} ({answer['host']})"
            problems += [
                f"{where}: {key} {path} is not there; local paths must be on storage every "
                "node shares (or use Hub ids, which each node downloads)"
                for key, path in answer["missing"]
            ]
            if not answer["output_shared"]:
                problems.append(
                    f"{where}: does not see this machine's files in sweep.output ({out}); the "
                    "output folder must be on storage every node shares"
                )
            if answer["version"] != mergetui.__version__:
                problems.append(
                    f"{where}: runs mergetui {answer['version']}, this machine "
                    f"{mergetui.__version__}; install the same version on every node"
                )
        if problems:
            raise MergeTuiError("the Ray cluster cannot run this sweep:\n" + "\n".join(problems))
        return len(nodes)

    def _forward(self) -> None:
        """Pass on the progress the tasks sent so far (a message can come after its trial's
        result: displays drop those)."""
        if self.messages is None or self.report is None:
            return
        for message in self.ray.get(self.messages.take.remote()):
            self.report(*message)

    def _results(self, refs: list[Any]) -> Iterator[Any]:
        """Each result as it comes (a task's error raised here, with its traceback), the
        progress before it; on a stop the tasks in flight are cancelled."""
        ray = self.ray
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=REPORT_EVERY_S)
            self._forward()
            for ref in done:
                yield ray.get(ref)
            if self.cancel.is_set() and pending:
                for ref in pending:
                    ray.cancel(ref, force=True)
                raise MergeCancelled(STOPPED)

    def parents(self) -> dict[str, dict[str, float]]:
        task = self.ray.remote(_ray_parents).options(**self.resources.options())
        result: dict[str, dict[str, float]] = next(
            self._results([task.remote(self.sweep, self.device, self.messages)])
        )
        return result

    def run(self, jobs: list[TrialJob]) -> Iterator[TrialOutcome]:
        task = self.ray.remote(_ray_trial).options(**self.resources.options(), max_retries=0)
        yield from self._results(
            [task.remote(self.sweep, job, self.device, self.messages) for job in jobs]
        )

    def close(self) -> None:
        self.ray.shutdown()
