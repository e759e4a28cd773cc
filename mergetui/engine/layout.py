"""Lay out the output tensors of a merge, each with its inputs and its own resolved parameters.

For every output tensor the layout says which source tensors feed it (under which name: in a
frankenmerge, output layer 30 may be layer 22 of another model), which of them is the base, and the
value of every parameter for that tensor, gradients and filters resolved. Everything here works
from headers and config.json; problems (a layer range past a model's end, a missing tensor, a
filter that matches nothing, a required parameter some tensor gets no value for) are collected for
the plan, before any weight is read.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mergetui.engine.layers import (
    group_by_layer,
    layer_count,
    layer_index,
    per_layer_config,
    position_in,
    with_layer,
)
from mergetui.methods.registry import MethodSpec, ParamSpec
from mergetui.recipe.params import Filtered, Missing, ParamValue, resolve_chain
from mergetui.recipe.schema import Recipe, Slice
from mergetui.sources.checkpoint import SAFETENSORS_DTYPES, TORCH_TO_SAFETENSORS, TensorSpec

if TYPE_CHECKING:
    from mergetui.engine.plan import Source
    from mergetui.engine.vocabulary import VocabularyPlan

_MAX_SAME_PROBLEMS = 3


@dataclass(frozen=True)
class TensorInput:
    """One source tensor read for an output tensor: the source's role and the tensor's name there."""

    role: str
    name: str


@dataclass
class PlannedTensor:
    """One output tensor: merged from float inputs, or copied from the inputs when not float.

    ``base`` and ``inputs`` are what the kernel receives (``inputs`` in model order, with
    ``model_params`` beside them); ``params`` are the method-wide parameters resolved for this
    tensor. ``copy``: a lone input taken as it is. ``layer``/``origin`` describe where an output
    layer comes from, for the layout the check step shows.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    merge: bool
    bytes_in: int
    bytes_out: int
    base: TensorInput | None = None
    inputs: tuple[TensorInput, ...] = ()
    params: dict[str, Any] = field(default_factory=dict)
    model_params: tuple[dict[str, Any], ...] = ()
    copy: bool = False
    layer: int | None = None
    #: rows aligned to this output vocabulary before merging (None: rows merged as stored)
    vocabulary: VocabularyPlan | None = None
    #: inputs read only for the alignment's default rows (the base, for a method that ignores it)
    for_alignment: tuple[TensorInput, ...] = ()
    #: rows per block when the tensor is merged in blocks to fit the memory budget (None: whole)
    block_rows: int | None = None
    #: reading passes over the tensor when merged in blocks (the method's statistics need them)
    passes: int = 1

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def reads(self) -> tuple[TensorInput, ...]:
        """Every input, the base first (then any read for the alignment only)."""
        base = (self.base,) if self.base is not None else ()
        return base + self.inputs + self.for_alignment


@dataclass(frozen=True)
class LayerOrigin:
    """Where one output layer comes from: ``(source label, source layer)`` for each input."""

    layer: int
    slice_index: int
    sources: tuple[tuple[str, int], ...]


@dataclass
class Layout:
    tensors: list[PlannedTensor]
    problems: list[tuple[str, str]]  # (severity, message)
    config_updates: dict[str, Any] = field(default_factory=dict)
    layers: list[LayerOrigin] = field(default_factory=list)


class _Resolver:
    """Resolves parameters per tensor and remembers which filters ever matched."""

    def __init__(self, method: MethodSpec) -> None:
        self.method = method
        self.problems: list[tuple[str, str]] = []
        self._missing: dict[str, int] = {}
        self.filters: dict[str, tuple[Filtered, set[str]]] = {}

    def note_filters(self, where: str, value: ParamValue | None, name: str) -> None:
        if isinstance(value, Filtered):
            _, seen = self.filters.setdefault(where, (value, set()))
            seen.update(p for p in value.patterns if p in name)

    def resolve(
        self,
        param: ParamSpec,
        levels: list[tuple[str, ParamValue | None, str]],
        position: float,
        tensor: str,
        required: bool = True,
    ) -> Any:
        """``levels``: ``(key for messages, value, name its filters see)``, highest first."""
        for where, value, name in levels:
            self.note_filters(f"{where}{param.name}", value, name)
        found = resolve_chain(((v, n) for _, v, n in levels), position)
        if isinstance(found, Missing):
            if not param.required:
                return param.default
            if required:
                self._report_missing(param, levels, tensor)
            return None
        if param.kind is bool:
            return bool(found)
        if param.kind is int:
            return int(found)
        return float(found)

    def _report_missing(
        self, param: ParamSpec, levels: list[tuple[str, ParamValue | None, str]], tensor: str
    ) -> None:
        where = next((w for w, v, _ in levels if v is not None), levels[-1][0]) + param.name
        count = self._missing.get(where, 0)
        self._missing[where] = count + 1
        if count < _MAX_SAME_PROBLEMS:
            self.problems.append(
                (
                    "error",
                    f"{where}: no value for tensor {tensor} (no filter matches it and there is no "
                    f"default); add default = ... to {where}",
                )
            )

    def check_rules(self, tensor: PlannedTensor, key_of: Callable[[int], str]) -> None:
        """The method's own rules on this tensor's resolved parameters (e.g. DELLA's density ±
        epsilon); each problem is reported for at most a few tensors."""
        for rule in self.method.tensor_rules:
            for index, problem in rule(tensor.params, tensor.model_params):
                where = "merge.parameters" if index is None else key_of(index)
                count = self._missing.get(f"{where}: {problem}", 0)
                self._missing[f"{where}: {problem}"] = count + 1
                if count < _MAX_SAME_PROBLEMS:
                    self.problems.append(("error", f"{where}: tensor {tensor.name}: {problem}"))

    def unmatched_filter_warnings(self) -> list[tuple[str, str]]:
        warnings = []
        for where, (value, seen) in self.filters.items():
            for pattern in value.patterns:
                if pattern not in seen:
                    warnings.append(
                        (
                            "warning",
                            f"{where}: the filter `{pattern}` matches no tensor name, so it "
                            "changes nothing; filters match part of a name such as "
                            "model.layers.0.self_attn.q_proj.weight (e.g. self_attn, mlp)",
                        )
                    )
        return warnings


def out_element_size(dtype: str) -> int:
    """Bytes per element of the output dtype."""
    return SAFETENSORS_DTYPES[TORCH_TO_SAFETENSORS[dtype]][1]


def layout_models(
    recipe: Recipe,
    method: MethodSpec,
    reference: Source,
    sources: list[Source],
    out_dtype: str,
) -> Layout:
    """Whole models: every tensor of the reference, in its on-disk order (reads are sequential),
    merged from the same-named tensor of every model (and of the base when the method uses it)."""
    resolver = _Resolver(method)
    by_role = {s.role: s for s in sources}
    base = by_role.get("base") if method.uses_base else None
    model_roles = [f"models[{i}]" for i in range(len(recipe.models))]
    specs = sorted(
        reference.checkpoint.tensors.values(), key=lambda s: (str(s.file), s.offset, s.name)
    )
    count = layer_count(reference.checkpoint.config) or 0
    tensors = []
    for spec in specs:
        name = spec.name
        base_input = TensorInput("base", name) if base is not None else None
        inputs = tuple(TensorInput(role, name) for role in model_roles)
        if not spec.is_float:
            reads = (TensorInput(reference.role, name),) + tuple(
                i for i in (base_input, *inputs) if i is not None and i.role != reference.role
            )
            tensors.append(
                PlannedTensor(
                    name,
                    spec.shape,
                    spec.dtype,
                    False,
                    _bytes_in(reads, by_role),
                    spec.nbytes,
                    inputs=reads,
                )
            )
            continue
        position = position_in(layer_index(name), count)
        params = {
            p.name: resolver.resolve(
                p, [("merge.parameters.", recipe.parameters.get(p.name), name)], position, name
            )
            for p in method.global_params
        }
        model_params = tuple(
            {
                p.name: resolver.resolve(
                    p, [(f"models[{i}].", entry.parameters.get(p.name), name)], position, name
                )
                for p in method.model_params
            }
            for i, entry in enumerate(recipe.models)
        )
        planned = PlannedTensor(
            name,
            spec.shape,
            out_dtype,
            True,
            0,
            spec.numel * out_element_size(out_dtype),
            base=base_input,
            inputs=inputs,
            params=params,
            model_params=model_params,
        )
        planned.bytes_in = _bytes_in(planned.reads, by_role)
        _check_weight_sum(resolver, planned)
        resolver.check_rules(planned, lambda index: f"models[{index}]")
        tensors.append(as_byte_copy(planned, spec, by_role, method))
    problems = resolver.problems + resolver.unmatched_filter_warnings()
    return Layout(tensors, problems)


def as_byte_copy(
    tensor: PlannedTensor, spec: TensorSpec, by_role: dict[str, Source], method: MethodSpec
) -> PlannedTensor:
    """A tensor that only copies one input unchanged (a lone source, or a method whose parameters
    make it the identity, such as passthrough with scale 1) already stored in the output dtype,
    without a LoRA adapter, is copied as stored bytes: no float32 round trip (which would give the
    same bits, three passes later)."""
    unchanged = tensor.copy or (
        tensor.base is None
        and len(tensor.model_params) == 1
        and not tensor.params
        and method.returns_lone_input(tensor.model_params[0])
    )
    if (
        not unchanged
        or len(tensor.reads) != 1
        or spec.dtype != tensor.dtype
        or by_role[tensor.reads[0].role].lora is not None
    ):
        return tensor
    return PlannedTensor(
        tensor.name,
        tensor.shape,
        spec.dtype,
        False,
        tensor.bytes_in,
        spec.nbytes,
        inputs=tensor.reads,
        layer=tensor.layer,
    )


def _bytes_in(reads: tuple[TensorInput, ...], by_role: dict[str, Source]) -> int:
    total = 0
    for read in reads:
        spec = by_role[read.role].checkpoint.tensors.get(read.name)
        total += spec.nbytes if spec is not None else 0
    return total


def _check_weight_sum(resolver: _Resolver, tensor: PlannedTensor) -> None:
    """Weights that sum to zero under ``normalize`` would divide by zero (rejected up front for
    scalar weights; gradients and filters are checked here, tensor by tensor)."""
    switch = resolver.method.normalize_switch
    if switch is None or not tensor.params.get(switch) or not tensor.model_params:
        return
    weights = [p.get("weight") for p in tensor.model_params]
    if len(weights) < 2 or not all(isinstance(w, float) for w in weights):
        return
    if abs(sum(w for w in weights if isinstance(w, float))) < 1e-8:
        resolver.problems.append(
            (
                "error",
                f"tensor {tensor.name}: the weights sum to 0 there ({', '.join(map(str, weights))})"
                f" and {switch} is on, which would divide by zero; change the weights' values "
                f"for this part of the model or set {switch} = false",
            )
        )


def layout_slices(
    recipe: Recipe,
    method: MethodSpec,
    source_of: Callable[[str, str | None], Source],
    out_dtype: str,
    files_config: dict[str, Any],
    vocabulary_names: frozenset[str] = frozenset(),
) -> Layout:
    """An output made of layer ranges (mergekit's ``slices``): output layers numbered on across
    the slices, output layer ``k`` of a slice read from layer ``start + k`` of each of its sources;
    embeddings merged from the first slice's sources and the final norm and head from the last
    slice's, as mergekit does."""
    resolver = _Resolver(method)
    problems: list[tuple[str, str]] = []
    tensors: list[PlannedTensor] = []
    origins: list[LayerOrigin] = []
    layer_sources: list[tuple[dict[str, Any], int]] = []
    range_ok = _check_ranges(recipe, source_of, problems)
    if not range_ok:
        return Layout([], problems)
    first, last = recipe.slices[0], recipe.slices[-1]
    first_source = source_of(first.sources[0].model, first.sources[0].lora)
    last_source = source_of(last.sources[0].model, last.sources[0].lora)
    _, before, _ = group_by_layer(first_source.checkpoint.tensors)
    _, _, after = group_by_layer(last_source.checkpoint.tensors)
    context = _SliceContext(recipe, method, source_of, out_dtype, resolver, problems)
    context.vocabulary_names = vocabulary_names
    for name in before:
        tensors += context.tensor(0, first, name, [name] * len(first.sources), None, 0.0)
    out_layer = 0
    for slice_index, piece in enumerate(recipe.slices):
        lead = source_of(piece.sources[0].model, piece.sources[0].lora)
        layers, _, _ = group_by_layer(lead.checkpoint.tensors)
        count = piece.layer_count
        for offset in range(count):
            position = position_in(offset, count)
            source_layers = [s.layer_range[0] + offset for s in piece.sources]
            for name in layers.get(source_layers[0], []):
                names = [with_layer(name, layer) for layer in source_layers]
                tensors += context.tensor(
                    slice_index, piece, with_layer(name, out_layer), names, out_layer, position
                )
            origins.append(
                LayerOrigin(
                    out_layer,
                    slice_index,
                    tuple(
                        (source_of(s.model, s.lora).ref.text, layer)
                        for s, layer in zip(piece.sources, source_layers, strict=True)
                    ),
                )
            )
            layer_sources.append((lead.checkpoint.config, source_layers[0]))
            out_layer += 1
    last_index = len(recipe.slices) - 1
    for name in after:
        tensors += context.tensor(last_index, last, name, [name] * len(last.sources), None, 0.0)
    updates = per_layer_config(files_config, layer_count(files_config) or 0, layer_sources)
    problems += resolver.problems + resolver.unmatched_filter_warnings()
    return Layout(tensors, problems, updates, origins)


def _check_ranges(
    recipe: Recipe, source_of: Callable[[str, str | None], Source], problems: list[tuple[str, str]]
) -> bool:
    """Every layer range inside its model (from config.json), before anything else is laid out."""
    ok = True
    for index, piece in enumerate(recipe.slices):
        for number, item in enumerate(piece.sources):
            source = source_of(item.model, item.lora)
            count = layer_count(source.checkpoint.config)
            if count is None:
                problems.append(
                    (
                        "error",
                        f"slices[{index}].sources[{number}]: {source.label} does not say how many "
                        "layers it has (no num_hidden_layers in config.json), so its layer_range "
                        "cannot be checked",
                    )
                )
                ok = False
            elif item.layer_range[1] > count:
                problems.append(
                    (
                        "error",
                        f"slices[{index}].sources[{number}].layer_range: "
                        f"{list(item.layer_range)} runs past the end of {source.label}, which has "
                        f"{count} layers (0 to {count - 1}); the end is at most {count}",
                    )
                )
                ok = False
    return ok


class _SliceContext:
    """Builds the planned tensors of one slice: inputs, base, per-source parameters."""

    def __init__(
        self,
        recipe: Recipe,
        method: MethodSpec,
        source_of: Callable[[str, str | None], Source],
        out_dtype: str,
        resolver: _Resolver,
        problems: list[tuple[str, str]],
    ) -> None:
        self.recipe = recipe
        self.method = method
        self.source_of = source_of
        self.out_dtype = out_dtype
        self.resolver = resolver
        self.problems = problems
        self._reported: set[tuple[str, str]] = set()
        #: vocabulary-indexed tensors: their row counts may differ (the vocabulary plan aligns them)
        self.vocabulary_names: frozenset[str] = frozenset()

    def tensor(
        self,
        slice_index: int,
        piece: Slice,
        out_name: str,
        names: list[str],
        out_layer: int | None,
        position: float,
    ) -> list[PlannedTensor]:
        where = f"slices[{slice_index}]."
        reads: list[tuple[int, TensorInput]] = []
        specs: list[TensorSpec] = []
        for number, (item, name) in enumerate(zip(piece.sources, names, strict=True)):
            source = self.source_of(item.model, item.lora)
            spec = source.checkpoint.tensors.get(name)
            if spec is None:
                self._problem(
                    f"{where}sources[{number}]",
                    f"{where}sources[{number}]: {source.label} has no tensor {name} (needed for "
                    f"output tensor {out_name}); check its layer_range and that it is the same "
                    "architecture",
                )
                return []
            rows_only = (
                name in self.vocabulary_names and specs and spec.shape[1:] == specs[0].shape[1:]
            )
            if specs and spec.shape != specs[0].shape and not rows_only:
                self._problem(
                    f"{where}shape",
                    f"{where}sources: shape mismatch in {name}: "
                    f"{reads[0][1].role} has {list(specs[0].shape)}, {source.label} has "
                    f"{list(spec.shape)}",
                )
                return []
            specs.append(spec)
            reads.append((number, TensorInput(source.role, name)))
        lead = specs[0]
        by_role = {
            r.role: self.source_of(i.model, i.lora)
            for (_, r), i in zip(reads, piece.sources, strict=True)
        }
        all_reads = tuple(r for _, r in reads)
        if not lead.is_float:
            return [
                PlannedTensor(
                    out_name,
                    lead.shape,
                    lead.dtype,
                    False,
                    _bytes_in(all_reads, by_role),
                    lead.nbytes,
                    inputs=all_reads,
                    layer=out_layer,
                )
            ]
        out_bytes = lead.numel * out_element_size(self.out_dtype)
        method = self.method
        slice_base = piece.base or self.recipe.base
        if len(reads) == 1 and not method.merges_lone_input:
            copied = PlannedTensor(
                out_name,
                lead.shape,
                self.out_dtype,
                True,
                _bytes_in(all_reads, by_role),
                out_bytes,
                inputs=all_reads,
                copy=True,
                layer=out_layer,
            )
            return [as_byte_copy(copied, lead, by_role, method)]
        base_input = None
        inputs: list[TensorInput] = []
        model_params: list[dict[str, Any]] = []
        input_keys: list[str] = []
        for (number, read), item in zip(reads, piece.sources, strict=True):
            if method.uses_base and item.model == slice_base and item.lora is None:
                base_input = read
                continue
            inputs.append(read)
            input_keys.append(f"{where}sources[{number}]")
            model_params.append(
                {
                    p.name: self.resolver.resolve(
                        p,
                        [
                            (f"{where}sources[{number}].", item.parameters.get(p.name), read.name),
                            (f"{where}parameters.", piece.parameters.get(p.name), read.name),
                            ("merge.parameters.", self.recipe.parameters.get(p.name), read.name),
                        ],
                        position,
                        read.name,
                    )
                    for p in method.model_params
                }
            )
        params = {
            p.name: self.resolver.resolve(
                p,
                [
                    (f"{where}parameters.", piece.parameters.get(p.name), out_name),
                    ("merge.parameters.", self.recipe.parameters.get(p.name), out_name),
                ],
                position,
                out_name,
            )
            for p in method.global_params
        }
        planned = PlannedTensor(
            out_name,
            lead.shape,
            self.out_dtype,
            True,
            _bytes_in(all_reads, by_role),
            out_bytes,
            base=base_input,
            inputs=tuple(inputs),
            params=params,
            model_params=tuple(model_params),
            layer=out_layer,
        )
        _check_weight_sum(self.resolver, planned)
        self.resolver.check_rules(planned, lambda index: input_keys[index])
        return [as_byte_copy(planned, lead, by_role, method)]

    def _problem(self, key: str, message: str) -> None:
        if (key, message) not in self._reported and len(self._reported) < 20:
            self._reported.add((key, message))
            self.problems.append(("error", message))
