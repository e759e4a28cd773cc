"""The one place where merge methods are declared.

Each :class:`MethodSpec` lists the method's parameters (type, range, default, scope, one-line help), what
it needs as inputs, and where its tensor kernel lives. The recipe validator, the CLI help, the model card
and the TUI forms are all generated from this table, so adding a method means adding a kernel module and
one entry here — nothing in the validator or the executor changes.

This module must stay importable without torch: the CLI and the TUI read it at start-up. Kernels are
referenced by ``"module:function"`` and imported only when a merge runs.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Scope = Literal["global", "model"]
#: The smallest piece of a tensor a kernel's math can be applied to on its own, once the
#: method's whole-tensor statistics are known: any run of elements, or whole rows.
BlockUnit = Literal["elements", "rows"]
#: A check of the parameters resolved for one tensor: ``(method-wide, per model) -> problems``,
#: each naming the model it concerns by its index among the tensor's inputs (None: all of them).
TensorRule = Callable[[dict[str, Any], tuple[dict[str, Any], ...]], list[tuple[int | None, str]]]


class _Required:
    """Sentinel default for parameters the user must give."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a merge method.

    ``scope="global"`` parameters live in ``[merge.parameters]``; ``scope="model"`` ones live beside each
    ``[[models]]`` entry, and a value in ``[merge.parameters]`` is the default for every model.
    """

    name: str
    kind: type
    help: str
    scope: Scope = "global"
    default: Any = REQUIRED
    minimum: float | None = None
    maximum: float | None = None
    min_inclusive: bool = True
    max_inclusive: bool = True

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def range_text(self) -> str:
        """The accepted range in interval notation, e.g. ``(0, 1]``; empty when unbounded."""
        if self.kind is bool or (self.minimum is None and self.maximum is None):
            return ""
        low = "-inf" if self.minimum is None else _fmt(self.minimum)
        high = "inf" if self.maximum is None else _fmt(self.maximum)
        left = "[" if self.min_inclusive and self.minimum is not None else "("
        right = "]" if self.max_inclusive and self.maximum is not None else ")"
        return f"{left}{low}, {high}{right}"

    def coerce(self, value: Any) -> tuple[Any, str | None]:
        """Return ``(value, None)`` converted to this parameter's type, or ``(None, problem)``."""
        if self.kind is bool:
            if isinstance(value, bool):
                return value, None
            return None, f"must be true or false, not {value!r}"
        if self.kind in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return None, f"must be a number, not {value!r}"
            if self.kind is int and isinstance(value, float) and not value.is_integer():
                return None, f"must be a whole number, not {value!r}"
            number = self.kind(value)
            if isinstance(number, float) and not math.isfinite(number):
                return None, f"must be a finite number, not {value!r}"
            if not self._in_range(number):
                return None, f"must be in {self.range_text()}, not {value!r}"
            return number, None
        raise TypeError(f"unsupported parameter kind {self.kind!r}")  # a registry bug

    def _in_range(self, number: float) -> bool:
        if self.minimum is not None and (
            number < self.minimum or (number == self.minimum and not self.min_inclusive)
        ):
            return False
        return not (
            self.maximum is not None
            and (number > self.maximum or (number == self.maximum and not self.max_inclusive))
        )


def _width(shape: tuple[int, ...]) -> int:
    """Entries per row (along the first dimension)."""
    return math.prod(shape[1:]) if shape else 1


def _fmt(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else str(number)


@dataclass(frozen=True)
class BlockPlan:
    """How one tensor is merged in blocks of rows: the reading passes (1: each block merged on its
    own) and the number of rows every block's size is a multiple of."""

    passes: int = 1
    align_rows: int = 1


#: Decides, for one tensor (its shape, its method-wide and per-model parameters), how it is merged
#: in blocks, or says why it must stay whole: for methods whose passes or alignment depend on them.
BlockRule = Callable[
    [tuple[int, ...], Mapping[str, Any], tuple[Mapping[str, Any], ...]], "BlockPlan | str"
]


def rows_aligned_to(elements: int, width: int) -> int:
    """The fewest rows of ``width`` entries that make a multiple of ``elements`` entries."""
    return elements // math.gcd(elements, width) if elements > 1 and width else 1


@dataclass(frozen=True)
class Blocks:
    """How a method's math divides over one tensor, so that very large tensors can be streamed in
    blocks of rows without touching the math.

    ``unit``: the smallest piece the math applies to independently (``"rows"`` when something is
    computed per row, such as DELLA's magnitude ranks or a row-wise norm). ``statistics``: what a
    first pass over the whole tensor must compute before any block can be merged (a top-k
    threshold, a norm, a cosine, an L1 norm to rescale to); empty when every block is independent.
    """

    unit: BlockUnit = "elements"
    statistics: tuple[str, ...] = ()
    #: Reading passes over a tensor merged in blocks, the last one merging: the first ones gather
    #: the statistics (``MethodSpec.block_kernel`` says how).
    passes: int = 1
    #: Blocks must hold whole row chunks (:func:`rows_per_chunk` rows, counted from the tensor's
    #: start): a statistic summed chunk by chunk in float64 then adds the same chunks in the same
    #: order, so blocks give the same bits. Row chunks, not a fixed count of entries, so that the
    #: smallest block stays a few MiB at any width. (DARE's and DELLA's random draws need no
    #: alignment: they are counter-based, a function of the flat index, ``methods.philox``.)
    row_chunks: bool = False
    #: When the passes or the alignment depend on the parameters or the shape: decides per tensor
    #: instead of ``passes`` and ``row_chunks``, which are then left at their defaults.
    rule: BlockRule | None = None

    @property
    def independent(self) -> bool:
        """True when blocks can be merged in one pass, each on its own."""
        return not self.statistics


@dataclass(frozen=True)
class MethodSpec:
    """A merge method: what it takes, what it needs, and where its kernel lives.

    ``needs_base``: the base takes part in the math (task vectors are ``model - base``). Methods that do
    not need it still accept a base, which then only supplies the architecture reference, config and
    tokenizer, unless ``optional_base`` says the math uses it when one is given (nuslerp and
    multislerp interpolate task vectors then, the models themselves without one).
    ``merges_lone_input``: the kernel still runs when a tensor has a single input (a weight or a
    scale applies to it); otherwise a lone input is passed through unchanged, as mergekit does.
    ``identity``: parameter values with which the kernel returns a lone input unchanged, so the
    engine may copy its stored bytes instead. ``blocks``: how the math divides over a tensor.
    ``tensor_rules``: checks of the parameters resolved for one tensor (gradients and filters
    make them vary by tensor), run on the plan before any weight is read.
    ``work_buffers``: how many float32 temporaries of one tensor's full size the kernel holds at its
    peak beyond its inputs (chunked temporaries do not count); the planner uses it for the memory
    estimate. The built-in kernels work in place and in chunks, so theirs is 0.
    """

    name: str
    summary: str
    when_to_use: str
    kernel: str
    params: tuple[ParamSpec, ...] = ()
    needs_base: bool = False
    optional_base: bool = False
    min_models: int = 1
    max_models: int | None = None
    randomized: bool = False
    work_buffers: int = 0
    merges_lone_input: bool = False
    identity: tuple[tuple[str, Any], ...] = ()
    blocks: Blocks = Blocks()
    #: ``"module:function"`` making the kernel that merges one tensor block by block when the
    #: method needs whole-tensor statistics (``blocks.statistics``); None for independent blocks
    #: (the plain kernel merges each block) or for a method that is always merged whole.
    block_kernel: str | None = None
    tensor_rules: tuple[TensorRule, ...] = ()
    notes: tuple[str, ...] = field(default=())

    @property
    def normalize_switch(self) -> str | None:
        """The parameter that makes the method divide by the sum of the weights, if any."""
        if self.param("weight") is None:
            return None
        return next((n for n in ("normalize", "normalize_weights") if self.param(n)), None)

    @property
    def uses_base(self) -> bool:
        """The base takes part in the math whenever one is given."""
        return self.needs_base or self.optional_base

    def returns_lone_input(self, model_params: dict[str, Any]) -> bool:
        """With these parameters and a single input, the kernel returns that input unchanged."""
        return bool(self.identity) and model_params == dict(self.identity)

    def param(self, name: str) -> ParamSpec | None:
        return next((p for p in self.params if p.name == name), None)

    @property
    def global_params(self) -> tuple[ParamSpec, ...]:
        return tuple(p for p in self.params if p.scope == "global")

    @property
    def model_params(self) -> tuple[ParamSpec, ...]:
        return tuple(p for p in self.params if p.scope == "model")

    def model_count_text(self) -> str:
        if self.max_models == self.min_models:
            return f"exactly {self.min_models}"
        if self.max_models is None:
            return f"at least {self.min_models}"
        return f"{self.min_models} to {self.max_models}"

    def load_kernel(self) -> Callable[..., Any]:
        """Import and return the tensor kernel (this is where torch gets imported)."""
        return _load(self.kernel)

    @property
    def mergeable_in_blocks(self) -> bool:
        """A tensor too large for the memory budget can be merged in blocks of rows, with the same
        bits as whole: the blocks are independent, or a block kernel gathers the statistics."""
        return self.blocks.independent or self.block_kernel is not None

    def block_plan(
        self,
        shape: tuple[int, ...],
        params: Mapping[str, Any],
        model_params: tuple[Mapping[str, Any], ...],
    ) -> BlockPlan | str:
        """How a merged tensor of ``shape`` goes in blocks of rows with these parameters, or why
        it must be merged whole."""
        if self.blocks.rule is not None:
            return self.blocks.rule(shape, params, model_params)
        if not self.mergeable_in_blocks:
            return f"{self.name} needs {', '.join(self.blocks.statistics)} over the whole tensor"
        if self.blocks.unit == "rows" and len(shape) != 2:
            return f"{self.name} works on rows and the tensor has {len(shape)} dimensions"
        passes = 1 if self.blocks.independent else self.blocks.passes
        return BlockPlan(passes, rows_per_chunk(_width(shape)) if self.blocks.row_chunks else 1)

    def load_block_kernel(self) -> Callable[..., Any]:
        """Import and return the factory of per-tensor block kernels (see
        :mod:`mergetui.methods.blocked`): the method's own, else one that runs the plain kernel on
        each block."""
        if self.block_kernel is not None:
            return _load(self.block_kernel)
        from mergetui.methods.blocked import independent_blocks

        kernel = self.load_kernel()
        return lambda context: independent_blocks(kernel)


def _load(reference: str) -> Callable[..., Any]:
    module_name, _, function_name = reference.partition(":")
    return getattr(importlib.import_module(module_name), function_name)


# --- shared parameter declarations ---------------------------------------------------------------

_WEIGHT = ParamSpec(
    "weight",
    float,
    "how much this model contributes (relative when normalize is on)",
    scope="model",
)
_DENSITY = ParamSpec(
    "density",
    float,
    "fraction of this model's task vector to keep",
    scope="model",
    default=1.0,
    minimum=0.0,
    maximum=1.0,
    min_inclusive=False,
)
_GAMMA = ParamSpec(
    "gamma",
    float,
    "fraction of this model's largest task-vector entries (outliers) to drop",
    scope="model",
    default=0.01,
    minimum=0.0,
    maximum=1.0,
)
_EPSILON = ParamSpec(
    "epsilon",
    float,
    "spread of the keep probability around density: a row's smallest entries are kept with "
    "density - epsilon, its largest with density + epsilon",
    scope="model",
    default=0.15,
    minimum=0.0,
    maximum=1.0,
    max_inclusive=False,
)
_LAMBDA = ParamSpec(
    "lambda",
    float,
    "scale applied to the merged task vector before adding it to the base",
    default=1.0,
)


def _normalize(default: bool) -> ParamSpec:
    return ParamSpec(
        "normalize",
        bool,
        "divide by the sum of the weights (per element where signs were elected)",
        default=default,
    )


def _rescale(default: bool) -> ParamSpec:
    return ParamSpec(
        "rescale",
        bool,
        "after dropping, rescale each task vector to its original L1 norm",
        default=default,
    )


def _della_bounds(
    params: dict[str, Any], model_params: tuple[dict[str, Any], ...]
) -> list[tuple[int | None, str]]:
    """DELLA keeps entries with probabilities from density - epsilon to density + epsilon, which
    must lie strictly inside (0, 1) wherever a task vector is pruned."""
    problems: list[tuple[int | None, str]] = []
    for index, values in enumerate(model_params):
        density, epsilon = values.get("density"), values.get("epsilon")
        if not isinstance(density, float) or not isinstance(epsilon, float) or density >= 1.0:
            continue
        if density - epsilon <= 0.0 or density + epsilon >= 1.0:
            problems.append(
                (
                    index,
                    f"density {density:g} ± epsilon {epsilon:g} spans "
                    f"[{density - epsilon:g}, {density + epsilon:g}], but keep probabilities must "
                    f"lie inside (0, 1); set epsilon below {min(density, 1.0 - density):g}",
                )
            )
    return problems


_RAM_EPSILON = ParamSpec(
    "epsilon",
    float,
    "a task-vector entry larger than this in magnitude counts as a change",
    default=1e-5,
    minimum=0.0,
)

_TA_KERNELS = "mergetui.methods.task_arithmetic"
_TA_BLOCKS = "mergetui.methods.task_arithmetic_blocks"
#: The kernels' chunk of temporaries (``task_arithmetic.CHUNK``; this module imports no torch).
KERNEL_CHUNK_ELEMENTS = 1 << 20
_RESCALE_STATISTIC = "each task vector's L1 norm before and after the drop (with rescale)"
_OUTLIER_STATISTIC = "each task vector's two magnitude-rank bounds"


def _sparsifies(model_params: tuple[Mapping[str, Any], ...]) -> bool:
    return any(float(p.get("density", 1.0)) < 1.0 for p in model_params)


def _breadcrumbs_blocks(
    shape: tuple[int, ...], params: Mapping[str, Any], model_params: tuple[Mapping[str, Any], ...]
) -> BlockPlan | str:
    """The magnitudes bounding the kept ranks: the top 16 bits, then the low 16 bits, then the
    merge; with ``rescale`` a pass for the kept L1 norms between (summed per row chunk)."""
    if not _sparsifies(model_params):
        return BlockPlan()
    if bool(params.get("rescale", False)):
        return BlockPlan(4, rows_per_chunk(_width(shape)))
    return BlockPlan(3)


def _della_blocks(name: str) -> BlockRule:
    def rule(
        shape: tuple[int, ...],
        params: Mapping[str, Any],
        model_params: tuple[Mapping[str, Any], ...],
    ) -> BlockPlan | str:
        """Ranks are per row, along dimension 1 (a tensor of more dimensions has
        ``prod(shape[2:])`` such rows per index of the first axis, which blocks of that axis hold
        whole), and the L1 norms are summed per step of ``CHUNK // shape[1]`` rows, so blocks
        hold whole steps; ``rescale`` adds a pass for the L1 norms around the drop."""
        if len(shape) < 2:
            return f"{name} works on rows and the tensor has 1 dimension"
        if not _sparsifies(model_params):
            return BlockPlan()
        step = max(1, KERNEL_CHUNK_ELEMENTS // max(shape[1], 1))
        rows_per_index = math.prod(shape[2:])
        aligned = step // math.gcd(step, rows_per_index) if rows_per_index else 1
        return BlockPlan(2 if bool(params.get("rescale", True)) else 1, aligned)

    return rule


def _sce_blocks(
    shape: tuple[int, ...], params: Mapping[str, Any], model_params: tuple[Mapping[str, Any], ...]
) -> BlockPlan | str:
    """With ``select_topk`` < 1, the variance threshold's top 16 bits (and the nonzero count),
    its low 16 bits, then the masking and the mean squares, then the merge; else the squares and
    the merge. The squares are summed per row chunk, so blocks hold whole row chunks."""
    passes = 4 if float(params.get("select_topk", 1.0)) < 1.0 else 2
    return BlockPlan(passes, rows_per_chunk(_width(shape)))


def _arcee_fusion_blocks(
    shape: tuple[int, ...], params: Mapping[str, Any], model_params: tuple[Mapping[str, Any], ...]
) -> BlockPlan | str:
    """The quartiles' top 16 bits, their low 16 bits, then the merge; a row's scores need that
    row's KL divergence along the last axis, which blocks of the first axis hold whole."""
    if len(shape) < 2:
        return "arcee_fusion works on rows and the tensor has 1 dimension"
    return BlockPlan(3)


#: Row chunks start a multiple of this many float32 entries (64 bytes) apart, so that a chunk read
#: in a block lies at the same alignment as in the whole tensor: vectorised loads (CUDA, MKL) then
#: add in the same order.
_ROW_CHUNK_ALIGNMENT = 16


def rows_per_chunk(width: int) -> int:
    """Rows in one chunk of the row-chunked kernels (model_stock, nuslerp, multislerp: see
    :mod:`mergetui.methods.chunked`): as many whole rows of ``width`` entries as fit in
    ``KERNEL_CHUNK_ELEMENTS``, in a multiple that keeps chunks 64-byte aligned, at least one such
    multiple. Unlike chunks of exactly 1M entries, any width gives chunks of a few MiB, so blocks aligned
    to them stay small whatever the width."""
    width = max(width, 1)
    step = rows_aligned_to(_ROW_CHUNK_ALIGNMENT, width)
    return max(step, KERNEL_CHUNK_ELEMENTS // (width * step) * step)


def _row_chunk_blocks(
    name: str, passes: Callable[[Mapping[str, Any], tuple[Mapping[str, Any], ...]], int]
) -> BlockRule:
    """The rule of a row-chunked kernel: blocks of whole row chunks, ``passes(params,
    model_params)`` reading passes (the kernel's own count, which it derives the same way)."""

    def rule(
        shape: tuple[int, ...],
        params: Mapping[str, Any],
        model_params: tuple[Mapping[str, Any], ...],
    ) -> BlockPlan | str:
        if len(shape) < 2:
            plural = "" if len(shape) == 1 else "s"
            return (
                f"{name} is merged in blocks of rows; the tensor has {len(shape)} dimension{plural}"
            )
        return BlockPlan(passes(params, model_params), rows_per_chunk(_width(shape)))

    return rule


def _karcher_passes(params: Mapping[str, Any], model_params: tuple[Any, ...]) -> int:
    """The Gram matrix, then the weighted sum; a single model is its own mean."""
    return 1 if len(model_params) == 1 else 2


def _model_stock_passes(params: Mapping[str, Any], model_params: tuple[Any, ...]) -> int:
    """Per row with ``filter_wise`` (each row chunk merged on its own); else the pairwise dots and
    norms over the whole tensor first."""
    return 1 if bool(params.get("filter_wise", False)) else 2


def _nuslerp_passes(params: Mapping[str, Any], model_params: tuple[Any, ...]) -> int:
    """The norms and dot product over the whole tensor (``nuslerp_flatten``) or per column
    (``nuslerp_row_wise``, summed over every row) first; per row, each row chunk on its own."""
    flatten = bool(params.get("nuslerp_flatten", True))
    return 2 if flatten or bool(params.get("nuslerp_row_wise", False)) else 1


def _multislerp_passes(params: Mapping[str, Any], model_params: tuple[Any, ...]) -> int:
    """The task vectors' norms, then the norm of their weighted mean direction, then the merge; a
    lone model is returned as it is."""
    return 3 if len(model_params) > 1 else 1


#: breadcrumbs' and breadcrumbs_ties' (the same sparsification)
_BREADCRUMBS_BLOCKS = Blocks(
    "elements",
    (_OUTLIER_STATISTIC, _RESCALE_STATISTIC),
    rule=_breadcrumbs_blocks,
)

METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec(
            name="linear",
            summary="Weighted average of the models' weights.",
            when_to_use="Models fine-tuned from one base on similar data; the simplest, safest merge.",
            kernel="mergetui.methods.linear:linear",
            params=(_WEIGHT, _normalize(True)),
            min_models=1,
            notes=("The base, if given, is not averaged: list it under [[models]] to include it.",),
            merges_lone_input=True,
        ),
        MethodSpec(
            name="slerp",
            summary="Spherical interpolation between the base and one other model.",
            when_to_use="Blending exactly two models while keeping weight norms; t picks the mix.",
            kernel="mergetui.methods.slerp:slerp",
            params=(
                ParamSpec(
                    "t",
                    float,
                    "interpolation factor: 0 gives the base, 1 gives the other model",
                    minimum=0.0,
                    maximum=1.0,
                ),
            ),
            needs_base=True,
            min_models=1,
            max_models=1,
            blocks=Blocks(
                "elements",
                ("both tensors' norms and their dot product",),
                passes=2,
                row_chunks=True,
            ),
            block_kernel="mergetui.methods.slerp:slerp_blocks",
        ),
        MethodSpec(
            name="task_arithmetic",
            summary="Add the weighted sum of task vectors (model - base) to the base.",
            when_to_use="Combining skills of several fine-tunes of one base, or subtracting one.",
            kernel=f"{_TA_KERNELS}:task_arithmetic",
            params=(_WEIGHT, _normalize(False), _LAMBDA),
            needs_base=True,
        ),
        MethodSpec(
            name="ties",
            summary="Trim each task vector to its largest entries, elect signs, merge the agreeing.",
            when_to_use="Several fine-tunes whose task vectors interfere; reduces sign conflicts.",
            kernel=f"{_TA_KERNELS}:ties",
            params=(_WEIGHT, _DENSITY, _normalize(True), _LAMBDA),
            needs_base=True,
            blocks=Blocks("elements", ("each task vector's k-th largest magnitude",), passes=3),
            block_kernel=f"{_TA_BLOCKS}:ties_blocks",
        ),
        MethodSpec(
            name="dare_ties",
            summary="Randomly drop task-vector entries (DARE), rescale, then elect signs (TIES).",
            when_to_use="Many fine-tunes with redundant deltas; sparsifies without ranking.",
            kernel=f"{_TA_KERNELS}:dare_ties",
            params=(_WEIGHT, _DENSITY, _normalize(False), _rescale(True), _LAMBDA),
            needs_base=True,
            randomized=True,
            blocks=Blocks("elements", (_RESCALE_STATISTIC,), passes=2, row_chunks=True),
            block_kernel=f"{_TA_BLOCKS}:dare_ties_blocks",
        ),
        MethodSpec(
            name="dare_linear",
            summary="Randomly drop task-vector entries (DARE), rescale, and add them up.",
            when_to_use="Like task_arithmetic, with sparsified task vectors to reduce interference.",
            kernel=f"{_TA_KERNELS}:dare_linear",
            params=(_WEIGHT, _DENSITY, _normalize(False), _rescale(True), _LAMBDA),
            needs_base=True,
            randomized=True,
            blocks=Blocks("elements", (_RESCALE_STATISTIC,), passes=2, row_chunks=True),
            block_kernel=f"{_TA_BLOCKS}:dare_linear_blocks",
        ),
        MethodSpec(
            name="breadcrumbs",
            summary="Drop each task vector's largest outliers and smallest entries (Model "
            "Breadcrumbs), then add them up.",
            when_to_use="Fine-tunes whose few huge deltas hurt when summed; keeps the mid-sized "
            "changes that carry the skill.",
            kernel=f"{_TA_KERNELS}:breadcrumbs",
            params=(_WEIGHT, _DENSITY, _GAMMA, _normalize(False), _rescale(False), _LAMBDA),
            needs_base=True,
            work_buffers=0,
            blocks=_BREADCRUMBS_BLOCKS,
            block_kernel=f"{_TA_BLOCKS}:breadcrumbs_blocks",
        ),
        MethodSpec(
            name="breadcrumbs_ties",
            summary="Model Breadcrumbs' sparsification, then TIES sign election.",
            when_to_use="Like breadcrumbs, for several fine-tunes whose task vectors disagree in "
            "sign.",
            kernel=f"{_TA_KERNELS}:breadcrumbs_ties",
            params=(_WEIGHT, _DENSITY, _GAMMA, _normalize(False), _rescale(False), _LAMBDA),
            needs_base=True,
            work_buffers=0,
            blocks=_BREADCRUMBS_BLOCKS,
            block_kernel=f"{_TA_BLOCKS}:breadcrumbs_ties_blocks",
        ),
        MethodSpec(
            name="della",
            summary="Drop task-vector entries at random, the small ones more often (DELLA's "
            "MagPrune), rescale, elect signs, merge the agreeing.",
            when_to_use="Like dare_ties, when the largest changes carry the skill: they are kept "
            "more often than the small ones.",
            kernel=f"{_TA_KERNELS}:della",
            params=(_WEIGHT, _DENSITY, _EPSILON, _normalize(True), _rescale(True), _LAMBDA),
            needs_base=True,
            randomized=True,
            tensor_rules=(_della_bounds,),
            blocks=Blocks("rows", (_RESCALE_STATISTIC,), rule=_della_blocks("della")),
            block_kernel=f"{_TA_BLOCKS}:della_blocks",
        ),
        MethodSpec(
            name="della_linear",
            summary="DELLA's magnitude-ranked random drop and rescale, then a weighted sum.",
            when_to_use="Like dare_linear, keeping the larger changes more often than the small "
            "ones.",
            kernel=f"{_TA_KERNELS}:della_linear",
            params=(_WEIGHT, _DENSITY, _EPSILON, _normalize(False), _rescale(True), _LAMBDA),
            needs_base=True,
            randomized=True,
            tensor_rules=(_della_bounds,),
            blocks=Blocks("rows", (_RESCALE_STATISTIC,), rule=_della_blocks("della_linear")),
            block_kernel=f"{_TA_BLOCKS}:della_linear_blocks",
        ),
        MethodSpec(
            name="sce",
            summary="Keep the elements where the models differ most, weight each task vector by "
            "its energy, erase sign conflicts, average (SCE).",
            when_to_use="Several fine-tunes and no time to tune weights: SCE derives them from the "
            "task vectors themselves.",
            kernel="mergetui.methods.sce:sce",
            params=(
                ParamSpec(
                    "select_topk",
                    float,
                    "fraction of the elements (those of highest variance across the models) kept",
                    default=1.0,
                    minimum=0.0,
                    maximum=1.0,
                ),
            ),
            needs_base=True,
            work_buffers=1,
            blocks=Blocks(
                "elements",
                ("the variance threshold of the top-k selection", "each task vector's mean square"),
                rule=_sce_blocks,
            ),
            block_kernel="mergetui.methods.sce:sce_blocks",
        ),
        MethodSpec(
            name="model_stock",
            summary="Move from the base towards the models' average by how aligned their task "
            "vectors are (Model Stock).",
            when_to_use="Several fine-tunes of one base from similar recipes (seeds, data orders); "
            "needs no weights to tune.",
            kernel="mergetui.methods.stock:model_stock",
            params=(
                ParamSpec(
                    "filter_wise",
                    bool,
                    "measure alignment per row (output channel) instead of over the whole tensor",
                    default=False,
                ),
            ),
            needs_base=True,
            min_models=2,
            blocks=Blocks(
                "rows",
                ("the task vectors' pairwise cosines (per row with filter_wise)",),
                rule=_row_chunk_blocks("model_stock", _model_stock_passes),
            ),
            block_kernel="mergetui.methods.stock:model_stock_blocks",
        ),
        MethodSpec(
            name="karcher",
            summary="The Karcher (Riemannian) mean of the models' directions, at their mean norm.",
            when_to_use="Averaging three or more models where a linear average would shrink the "
            "weights' norms; no weights to tune.",
            kernel="mergetui.methods.stock:karcher",
            params=(
                ParamSpec(
                    "max_iter",
                    int,
                    "most iterations of the mean's fixed-point search",
                    default=10,
                    minimum=1,
                ),
                ParamSpec(
                    "tol",
                    float,
                    "stop when a step is shorter than this (and ignore models whose norm is below)",
                    default=1e-5,
                    minimum=0.0,
                    min_inclusive=False,
                ),
            ),
            min_models=1,
            work_buffers=0,  # row-chunk temporaries only: the iteration runs on the Gram matrix
            notes=("The base, if given, is not averaged: list it under [[models]] to include it.",),
            blocks=Blocks(
                "elements",
                ("the models' pairwise dot products, which the mean direction's iteration needs",),
                rule=_row_chunk_blocks("karcher", _karcher_passes),
            ),
            block_kernel="mergetui.methods.stock:karcher_blocks",
        ),
        MethodSpec(
            name="nearswap",
            summary="Take the other model's values where they are within t of the base's, blend "
            "beyond.",
            when_to_use="Grafting a fine-tune's small, precise changes onto a base while keeping "
            "the base wherever the fine-tune moved far.",
            kernel="mergetui.methods.nearswap:nearswap",
            params=(
                ParamSpec(
                    "t",
                    float,
                    "distance under which the other model's value is taken whole",
                    minimum=0.0,
                    min_inclusive=False,
                ),
            ),
            needs_base=True,
            min_models=1,
            max_models=1,
            work_buffers=2,
        ),
        MethodSpec(
            name="nuslerp",
            summary="SLERP between two models at t = w2/(w1+w2), of their task vectors when a "
            "base is given, over the whole tensor, per row or per column.",
            when_to_use="Two models (or two fine-tunes of a base) blended by relative weights; "
            "row- or column-wise angles for tensors whose rows changed unevenly.",
            kernel="mergetui.methods.slerp:nuslerp",
            params=(
                ParamSpec(
                    "weight",
                    float,
                    "this model's share of the interpolation: t = w2/(w1+w2)",
                    scope="model",
                ),
                ParamSpec(
                    "nuslerp_flatten",
                    bool,
                    "take the angle over the whole tensor (off: per row, or per column with "
                    "nuslerp_row_wise)",
                    default=True,
                ),
                ParamSpec(
                    "nuslerp_row_wise",
                    bool,
                    "without nuslerp_flatten, interpolate each column instead of each row "
                    "(mergekit's name, whose docs say the opposite)",
                    default=False,
                ),
            ),
            optional_base=True,
            min_models=2,
            max_models=2,
            blocks=Blocks(
                "rows",
                ("the two vectors' norms and dot product (the whole tensor with nuslerp_flatten)",),
                rule=_row_chunk_blocks("nuslerp", _nuslerp_passes),
            ),
            block_kernel="mergetui.methods.slerp:nuslerp_blocks",
        ),
        MethodSpec(
            name="multislerp",
            summary="The weighted barycentre of several models (or task vectors, with a base) "
            "on the hypersphere, at their weighted mean norm.",
            when_to_use="SLERP's norm-keeping blend for three or more models, with weights.",
            kernel="mergetui.methods.slerp:multislerp",
            params=(
                _WEIGHT,
                ParamSpec(
                    "normalize_weights",
                    bool,
                    "divide the weights by their sum",
                    default=True,
                ),
                ParamSpec(
                    "eps",
                    float,
                    "added to norms before dividing by them",
                    default=1e-8,
                    minimum=0.0,
                ),
            ),
            optional_base=True,
            min_models=1,
            blocks=Blocks(
                "elements",
                ("the task vectors' norms and their weighted mean direction",),
                rule=_row_chunk_blocks("multislerp", _multislerp_passes),
            ),
            block_kernel="mergetui.methods.slerp:multislerp_blocks",
        ),
        MethodSpec(
            name="arcee_fusion",
            summary="Take the other model's changes only where their importance (change times "
            "the row's KL divergence) is an outlier; keep the base elsewhere.",
            when_to_use="Grafting the few changes of a fine-tune that matter most onto its "
            "base, with nothing to tune.",
            kernel="mergetui.methods.fusion:arcee_fusion",
            needs_base=True,
            min_models=1,
            max_models=1,
            work_buffers=4,
            blocks=Blocks(
                "rows",
                ("the quartiles of the importance scores",),
                rule=_arcee_fusion_blocks,
            ),
            block_kernel="mergetui.methods.fusion:arcee_fusion_blocks",
            notes=(
                "Quartiles are exact; mergekit estimates them from a random sample of a million "
                "scores on larger tensors.",
            ),
        ),
        MethodSpec(
            name="ram",
            summary="Keep each model's unique changes whole, average the changes several models "
            "share (RAM).",
            when_to_use="Fine-tunes that changed mostly different weights (agents, skills): "
            "unique changes are not diluted by averaging.",
            kernel="mergetui.methods.ram:ram",
            params=(_RAM_EPSILON,),
            needs_base=True,
            work_buffers=0,
        ),
        MethodSpec(
            name="ramplus_tl",
            summary="RAM, with each model's unique changes scaled up by how much of its change "
            "the others share (RAM+, per tensor).",
            when_to_use="Like ram, when a model whose changes overlap the others' would "
            "otherwise lose weight.",
            kernel="mergetui.methods.ram:ramplus_tl",
            params=(
                ParamSpec(
                    "r",
                    float,
                    "how strongly overlap scales unique changes up",
                    default=0.1,
                    minimum=0.0,
                ),
                ParamSpec(
                    "alpha",
                    float,
                    "cap on the shared-to-unique ratio used for the scale",
                    default=0.2,
                    minimum=0.0,
                ),
                _RAM_EPSILON,
            ),
            needs_base=True,
            work_buffers=0,
            blocks=Blocks(
                "elements", ("each model's counts of unique and shared changes",), passes=2
            ),
            block_kernel="mergetui.methods.ram:ramplus_tl_blocks",
        ),
        MethodSpec(
            name="passthrough",
            summary="Copy one model's tensors unchanged (optionally scaled).",
            when_to_use="Re-saving a model in another dtype or shard size, or folding in a LoRA.",
            kernel="mergetui.methods.passthrough:passthrough",
            params=(
                ParamSpec(
                    "scale",
                    float,
                    "multiply every tensor by this factor",
                    scope="model",
                    default=1.0,
                ),
            ),
            min_models=1,
            max_models=1,
            merges_lone_input=True,
            identity=(("scale", 1.0),),
        ),
    )
}


def get_method(name: str) -> MethodSpec | None:
    """The spec for ``name``, or None if there is no such method."""
    return METHODS.get(name)


def method_names() -> list[str]:
    return list(METHODS)
