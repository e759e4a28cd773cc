"""Fit a merge into a memory budget: which tensors are merged in blocks of rows, how many rows.

A tensor's working set is a float32 copy of each of its inputs (on the compute device) and its
output three times in the output dtype (being converted, queued and written). Whole, that follows
the largest tensor — for a 256K vocabulary and four sources, the embedding alone is 10 GiB. So a
tensor whose working set does not fit the budget twice over (the loader reads the next piece while
the current one merges) is read, merged and written in blocks of consecutive rows, each sized so
that two fit. Methods whose math needs a whole-tensor statistic read the tensor more than once
(the registry's ``blocks.passes``); the result has the same bits as whole (:mod:`mergetui.methods
.blocked`).

Some tensors are always merged whole: one-dimensional ones (a row of norms or biases: small), and
those a method's block rule keeps whole. Rows realigned to another vocabulary are read in blocks of output
rows, each input's rows gathered from where they are stored (:class:`~mergetui.engine.vocabulary
.RowAlignment`), with a pass first for each whole-tensor mean the alignment needs. A LoRA
adapter folded into a tensor is folded block by block, its ``B @ A`` made in the same groups of
rows either way (gathered rows read the groups they start or end inside whole). When a tensor
does not fit, the plan says which and why, and what budget would do: an error when the user set
``max_memory``, a warning when the default was in force.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from mergetui.engine.layout import PlannedTensor
from mergetui.methods.registry import BlockPlan, MethodSpec, rows_per_chunk
from mergetui.sources.lora import product_rows
from mergetui.units import format_bytes

#: The budget when neither ``--max-memory`` nor ``[merge] max_memory`` says otherwise.
DEFAULT_MAX_MEMORY = 1 << 30
#: Resident memory of the merge process once torch and the engine are imported and have run
#: (measured: 256 MiB for a merge of tiny models, torch's shared libraries included).
BASELINE_RSS = 256 * 1024**2
#: Staging buffers, the writer, the worker threads' stacks, the kernels' chunk-sized temporaries
#: and the allocator's slack (measured on the 256K-vocabulary bench: 60-100 MiB).
FIXED_WORKING_BYTES = 112 * 1024**2
#: The least room for buffers a budget must leave: less and every tensor would crawl.
MIN_WORKING_BYTES = 32 * 1024**2
#: Copies of an output piece on the host: being converted, queued for the writer, being written.
OUTPUT_COPIES = 3


@dataclass(frozen=True)
class MemoryPlan:
    """The budget and what it implies; ``explicit`` when the user set it."""

    max_memory: int
    explicit: bool
    #: bytes the float32 input buffers may hold at once (the loader's read-ahead stops there)
    pool_bytes: int
    #: tensors merged in blocks, and the one with the most blocks (name, rows per block, blocks)
    blocked: int
    largest_blocked: tuple[str, int, int] | None
    #: per tensor that does not fit although it should: (name, what keeps it from fitting, as
    #: "is merged whole because ..." or "is merged in blocks of at least N rows ...")
    over_budget: tuple[tuple[str, str], ...]
    #: the largest float32 working set and output piece of one step
    largest_float_bytes: int
    largest_output_bytes: int
    #: the tensor whose piece (whole, or one block) has the largest working set
    largest_piece: str

    def summary(self) -> str:
        """One line for `check`: the budget, and the block size it implies."""
        origin = "set" if self.explicit else "default; --max-memory or [merge] max_memory"
        text = f"memory budget {format_bytes(self.max_memory)} ({origin})"
        if self.largest_blocked is None:
            return text + ": every tensor is merged whole"
        name, rows, blocks = self.largest_blocked
        return (
            f"{text}: {self.blocked} tensor{'s' if self.blocked != 1 else ''} merged in blocks of "
            f"rows (largest: {name}, {blocks} blocks of {rows} rows)"
        )


def working_bytes(max_memory: int) -> int:
    """What a budget leaves for buffers once the process itself is counted."""
    return max_memory - BASELINE_RSS - FIXED_WORKING_BYTES


def minimum_budget() -> int:
    return BASELINE_RSS + FIXED_WORKING_BYTES + MIN_WORKING_BYTES


def block_plan(tensor: PlannedTensor, method: MethodSpec, has_lora: bool) -> BlockPlan | str:
    """How ``tensor`` is merged in blocks of rows, or why it cannot be."""
    if len(tensor.shape) < 2:
        return "it has one dimension"
    if not tensor.merge:  # copied as stored, block by block
        return BlockPlan()
    vocabulary = tensor.vocabulary
    roles = [read.role for read in tensor.reads]
    realigned = vocabulary is not None and not vocabulary.keeps_stored_rows(roles)
    how = (
        BlockPlan()
        if tensor.copy
        else method.block_plan(tensor.shape, tensor.params, tuple(tensor.model_params))
    )
    if has_lora and not realigned and isinstance(how, BlockPlan):
        # B @ A made in the same groups of rows as whole (gathered rows read whole groups)
        group = product_rows(tensor.numel // tensor.shape[0])
        how = BlockPlan(how.passes, math.lcm(how.align_rows, group))
    if realigned and isinstance(how, BlockPlan):
        assert vocabulary is not None
        statistics = vocabulary.alignment_statistics(roles)
        if statistics:  # a pass for each mean, summed in groups of rows that blocks hold whole
            group = rows_per_chunk(tensor.numel // tensor.shape[0])
            how = BlockPlan(how.passes + len(statistics), math.lcm(how.align_rows, group))
    return how


def rows_for(
    tensor: PlannedTensor, method: MethodSpec, out_size: int, working: int, align_rows: int = 1
) -> int | None:
    """Rows per block (a multiple of ``align_rows``) so that two blocks' buffers and outputs fit
    ``working``; None when the whole tensor fits that way (or the block would be no smaller)."""
    rows = tensor.shape[0]
    width = tensor.numel // rows if rows else 0
    if width == 0:
        return None
    held = tensor.bytes_in // tensor.numel  # a copied tensor's stored bytes
    if tensor.merge:
        held = 4 * (len(tensor.reads) + method.work_buffers)
    per_row = width * (held * 2 + out_size * OUTPUT_COPIES)
    fitting = working // per_row
    if fitting >= rows:
        return None
    chosen = max(align_rows, fitting // align_rows * align_rows)
    return chosen if chosen < rows else None


def plan_memory(
    tensors: list[PlannedTensor],
    method: MethodSpec,
    out_size: int,
    max_memory: int | None,
    lora_roles: set[str],
    extra_float_bytes: Callable[[PlannedTensor], int] = lambda tensor: 0,
    working: int | None = None,
) -> MemoryPlan:
    """Choose rows per block for every tensor (setting ``block_rows`` and ``passes`` on it) and
    sum up what the budget implies. ``extra_float_bytes``: float32 bytes a tensor holds beyond its
    inputs while merged whole (the stored rows of a vocabulary realignment). ``working``: the
    bytes left for buffers, when not derived from the budget (tests make tiny models' tensors
    go in blocks with it)."""
    budget = max_memory or DEFAULT_MAX_MEMORY
    if working is None:
        working = max(working_bytes(budget), MIN_WORKING_BYTES)
    blocked = 0
    largest_blocked: tuple[str, int, int] | None = None
    over: list[tuple[str, str]] = []
    largest_float = 0
    largest_output = 0
    largest_piece, largest_set = "", -1
    for tensor in tensors:
        tensor.block_rows = None
        tensor.passes = 1
        float_bytes = tensor.bytes_in  # a copied tensor's stored bytes
        if tensor.merge:
            float_bytes = tensor.numel * 4 * (len(tensor.reads) + method.work_buffers)
            float_bytes += extra_float_bytes(tensor)
        output_bytes = tensor.bytes_out
        if 2 * float_bytes + OUTPUT_COPIES * output_bytes > working:
            has_lora = any(read.role in lora_roles for read in tensor.reads)
            how = block_plan(tensor, method, has_lora)
            reason = how if isinstance(how, str) else None
            rows = None
            if isinstance(how, BlockPlan):
                rows = rows_for(tensor, method, out_size, working, how.align_rows)
            if rows is not None:
                assert isinstance(how, BlockPlan)
                tensor.block_rows = rows
                tensor.passes = how.passes
                blocks = -(-tensor.shape[0] // rows)
                blocked += 1
                if largest_blocked is None or blocks > largest_blocked[2]:
                    largest_blocked = (tensor.name, rows, blocks)
                fraction = rows / tensor.shape[0]
                float_bytes = math.ceil(float_bytes * fraction)
                output_bytes = math.ceil(output_bytes * fraction)
                if float_bytes + OUTPUT_COPIES * output_bytes > working:
                    over.append(
                        (
                            tensor.name,
                            f"is merged in blocks of at least {rows} "
                            f"{'row' if rows == 1 else 'rows'} (the smallest block "
                            f"{method.name}'s sums and ranks allow)",
                        )
                    )
            elif reason and float_bytes + OUTPUT_COPIES * output_bytes > working:
                over.append((tensor.name, f"is merged whole because {reason}"))
        largest_float = max(largest_float, float_bytes)
        largest_output = max(largest_output, output_bytes)
        if float_bytes + OUTPUT_COPIES * output_bytes > largest_set:
            largest_piece, largest_set = tensor.name, float_bytes + OUTPUT_COPIES * output_bytes
    pool = max(largest_float, working - OUTPUT_COPIES * largest_output)
    return MemoryPlan(
        max_memory=budget,
        explicit=max_memory is not None,
        pool_bytes=pool,
        blocked=blocked,
        largest_blocked=largest_blocked,
        over_budget=tuple(over),
        largest_float_bytes=largest_float,
        largest_output_bytes=largest_output,
        largest_piece=largest_piece,
    )


def peak_bytes(memory: MemoryPlan, on_cpu: bool) -> tuple[int, int | None]:
    """Estimated peak resident memory and, off the CPU, peak device memory: the buffers of the
    piece being merged and of the next one being read (as far as the pool allows), the output
    copies, the process baseline and the fixed buffers."""
    buffers = min(memory.pool_bytes, 2 * memory.largest_float_bytes)
    buffers = max(buffers, memory.largest_float_bytes)
    outputs = OUTPUT_COPIES * memory.largest_output_bytes
    host = BASELINE_RSS + FIXED_WORKING_BYTES + outputs + (buffers if on_cpu else 0)
    return host, None if on_cpu else buffers + FIXED_WORKING_BYTES
