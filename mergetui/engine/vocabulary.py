"""Vocabularies that differ: which tokens the output has, and where each model's row comes from.

Planned from the tokenizer files and headers (no weight is read), applied tensor by tensor:

- **Vocabulary-indexed tensors** are found from config.json and shapes: a tensor outside the layers
  whose first dimension is the model's ``vocab_size`` (the embedding, the head, an output bias).
  Their rows are aligned by token string, never by index.
- **The output vocabulary** (``merge.tokenizer``): the base's (or, without a base, the first
  model's), one model's, or the union: the base's tokens, then every other model's regular tokens
  it lacks, then every added token (with its flags; the first model to define it wins), models in
  recipe order. Tokens named in ``[merge.tokens]`` that no model has are added last.
- **Rows**: each model keeps its own row for every output token it has; for a token it lacks it
  gets a default row (``merge.missing_tokens``, or the ``[merge.tokens]`` override). Then the
  method merges the aligned matrices as usual, so under task arithmetic a token the base lacks but
  a fine-tune has keeps that fine-tune's row.
- **Row count**: the output vocabulary's size, but never fewer than the rows of the model whose
  vocabulary it is (its padding is kept, unlike mergekit, which shrinks a padded embedding), rounded
  up to ``pad_to_multiple_of``. Padding rows are each model's mean token row, as mergekit does.
- **Tied embeddings**: the output ties its head to its embedding when the model its config comes
  from does (or as ``merge.tie_word_embeddings`` says): then one tensor is written, and the heads
  of untied inputs are not used (a warning says so). An untied output takes a tied input's
  embedding as that input's head.

When every model already has the output's tokens at the same ids and rows, nothing is aligned and
the merge reads and writes exactly what it did before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mergetui.engine.layers import is_pre_weight, layer_index
from mergetui.engine.layout import TensorInput
from mergetui.errors import MergeFailed
from mergetui.methods.registry import rows_per_chunk
from mergetui.recipe.vocab import MISSING_TOKEN_RULES, TokenOverride, model_index
from mergetui.sources.vocabulary import AddedToken, Vocabulary, read_vocabulary

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    import torch

    from mergetui.engine.layout import PlannedTensor
    from mergetui.engine.plan import Source
    from mergetui.recipe.schema import Recipe

_SHOWN = 6  # tokens listed in a summary line


def vocab_rows(source: Source) -> int | None:
    """The model's embedding rows: config.json's ``vocab_size`` when a tensor outside the layers
    has that many rows, else the embedding's rows (a config left stale by a resize)."""
    tensors = source.checkpoint.tensors
    rows = source.checkpoint.config_value("vocab_size")
    outside = [s for n, s in tensors.items() if layer_index(n) is None and len(s.shape) == 2]
    valid = isinstance(rows, int) and not isinstance(rows, bool) and rows > 0
    if valid and (not outside or any(s.shape[0] == rows for s in outside)):
        return int(rows)
    embedding = next((s for s in outside if is_pre_weight(s.name)), None)
    return embedding.shape[0] if embedding is not None else None


def vocabulary_tensors(source: Source) -> dict[str, str]:
    """The model's vocabulary-indexed tensors, ``name → "embedding" | "head" | "other"``: outside
    the layers, one or two dimensions, the first as long as the vocabulary (from config.json), so a
    layer's weight that happens to have as many rows is never taken for one."""
    rows = vocab_rows(source)
    found: dict[str, str] = {}
    if rows is None:
        return found
    for name, spec in source.checkpoint.tensors.items():
        if layer_index(name) is not None or not spec.shape or len(spec.shape) > 2:
            continue
        if spec.shape[0] != rows or not spec.is_float:
            continue
        if len(spec.shape) == 1:
            found[name] = "other"
        elif is_pre_weight(name) and "out" not in name.rsplit(".", 2)[0]:
            found[name] = "embedding"
        else:
            found[name] = "head"
    return found


@dataclass
class ModelVocabulary:
    """What the plan knows of one source's vocabulary."""

    role: str
    label: str
    rows: int | None
    vocabulary: Vocabulary | None  # None: no tokenizer files
    tensors: dict[str, str]
    assumed: bool = False  # no tokenizer of its own: taken to be the reference's
    _usable: dict[str, int] | None = field(default=None, repr=False)
    _by_id: list[str | None] | None = field(default=None, repr=False)

    @property
    def embedding(self) -> str | None:
        return next((n for n, k in self.tensors.items() if k == "embedding"), None)

    @property
    def head(self) -> str | None:
        return next((n for n, k in self.tensors.items() if k == "head"), None)

    @property
    def tied(self) -> bool:
        """Stores no head of its own (its embedding is its head)."""
        return self.embedding is not None and self.head is None

    def usable(self) -> dict[str, int]:
        """Its tokens that have a row (computed once: vocabularies run to 256k tokens)."""
        if self._usable is None:
            vocabulary = self.vocabulary
            if vocabulary is None:
                self._usable = {}
            else:
                self._usable = vocabulary.within(self.rows) if self.rows else dict(vocabulary.ids)
        return self._usable

    def by_id(self) -> list[str | None]:
        """Its tokens that have a row, by id (None for an id without a token)."""
        if self._by_id is None:
            usable = self.usable()
            tokens: list[str | None] = [None] * (max(usable.values(), default=-1) + 1)
            for token, index in usable.items():
                tokens[index] = token
            self._by_id = tokens
        return self._by_id


@dataclass
class VocabularyPlan:
    """The output vocabulary and, per source role, output id → the source's row (−1: lacks it)."""

    setting: str
    tokenizer_from: str  # role whose tokenizer files are the output's starting point
    #: the output's tokens by id; None where the tokenizer has no token for an id (a gap)
    tokens: list[str | None]
    rows: int
    maps: dict[str, list[int]]
    models: dict[str, ModelVocabulary]
    missing_rule: str
    base_role: str | None
    overrides: dict[int, tuple[TokenOverride, str | None, int | None]] = field(default_factory=dict)
    #: tokens the output tokenizer gets beyond its source's, each with its flags (None: plain)
    new_tokens: list[tuple[str, AddedToken | None]] = field(default_factory=list)
    identity: bool = True
    out_tied: bool = False
    tied_changed: bool = False
    head_name: str | None = None
    embedding_name: str | None = None
    problems: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: the output's token count, kept when the tables were released (:meth:`release_tables`)
    released_size: int | None = None

    @property
    def builds_tokenizer(self) -> bool:
        """Whether the output tokenizer differs from its source's files (else they are copied)."""
        return bool(self.new_tokens)

    def aligned(self, name: str) -> bool:
        """Whether output tensor ``name`` has its rows aligned."""
        return not self.identity and any(name in m.tensors for m in self.models.values())

    def keeps_stored_rows(self, roles: Iterable[str]) -> bool:
        """Whether aligning leaves these roles' rows where they are stored: each maps output
        row i to its own row i, no token is forced to another row and no padding row is added.
        The common case of fine-tunes that appended tokens merged into the base's vocabulary:
        such a tensor is its stored rows cut to the output's, so it can be read in blocks."""
        count = len(self.tokens)
        if not count or self.rows != count:
            return False
        if any(override.force for override, _, _ in self.overrides.values()):
            return False
        identity = list(range(count))
        return all(self.maps.get(role) == identity for role in roles)

    def alignment_statistics(self, roles: Iterable[str]) -> tuple[str, ...]:
        """The whole-tensor means aligning these roles' rows needs before any row is final (see
        :class:`RowAlignment`): ``"base_mean"`` when some role lacks a token and the rule is
        ``base_mean``, ``"padding"`` when the output has rows past its last token."""
        roles = list(roles)
        found = []
        missing = any(-1 in self.maps[role] for role in roles)
        if self.missing_rule == "base_mean" and self.base_role in roles and missing:
            found.append("base_mean")
        if self.rows > len(self.tokens):
            found.append("padding")
        return tuple(found)

    def token_ids(self) -> dict[str, int]:
        return {token: index for index, token in enumerate(self.tokens) if token is not None}

    @property
    def size(self) -> int:
        """How many tokens the output vocabulary has (ids without a token not counted)."""
        if self.released_size is not None:
            return self.released_size
        return sum(1 for token in self.tokens if token is not None)

    @property
    def tables_needed(self) -> bool:
        """Whether the merge itself still needs the per-token tables: rows to realign, or a
        tokenizer to build."""
        return not self.identity or self.builds_tokenizer

    def release_tables(self) -> None:
        """Drop the per-token tables once the plan is reported, when the merge needs none of them:
        four models of a 256K vocabulary hold about 250 MiB in them, a quarter of the default
        memory budget. What the model card and a late report read (size, settings) stays."""
        if self.tables_needed:
            return
        self.released_size = self.size
        self.tokens = []
        self.maps = {}
        for model in self.models.values():
            model._usable = None
            model._by_id = None
            if model.vocabulary is not None:
                model.vocabulary.ids = {}


def _model_vocabularies(sources: list[Source]) -> dict[str, ModelVocabulary]:
    found = {}
    for source in sources:
        directory = source.checkpoint.directory
        if source.checkpoint.remote:  # not downloaded: its tokenizer files alone are fetched
            from mergetui.sources.hub import support_files

            directory = support_files(source.ref)
        vocabulary = read_vocabulary(directory, source.label)
        found[source.role] = ModelVocabulary(
            source.role, source.label, vocab_rows(source), vocabulary, vocabulary_tensors(source)
        )
    return found


def _role_of(text: str, recipe: Recipe, sources: list[Source]) -> str | None:
    """``base``, ``models[i]`` or a model reference → the role of its source."""
    if text == "base":
        return "base" if recipe.base else sources[0].role
    index = model_index(text)
    if index is not None:
        return f"models[{index}]"
    return next((s.role for s in sources if s.ref.text == text and s.lora_ref is None), None) or (
        next((s.role for s in sources if s.ref.text == text), None)
    )


def plan_vocabulary(recipe: Recipe, sources: list[Source]) -> VocabularyPlan:
    """Decide the output vocabulary and each model's row map, from tokenizer files and headers.

    Raises :class:`SourceError` when a tokenizer cannot be read (naming its file)."""
    models = _model_vocabularies(sources)
    reference = sources[0].role
    settings = recipe.vocabulary
    source_role = (
        reference
        if settings.tokenizer in ("base", "union")
        else (_role_of(settings.tokenizer, recipe, sources) or reference)
    )
    plan = VocabularyPlan(
        setting=settings.tokenizer,
        tokenizer_from=source_role,
        tokens=[],
        rows=models[source_role].rows or 0,
        maps={},
        models=models,
        missing_rule=settings.missing_tokens,
        base_role="base" if recipe.base else None,
    )
    _decide_tying(plan, recipe, sources)
    holders = [m for m in models.values() if m.tensors]
    if not holders or not models[source_role].tensors:
        return plan  # nothing indexed by the vocabulary (or not known from the headers)
    _assume_missing_tokenizers(plan, holders, source_role)
    if any(p[0] == "error" for p in plan.problems):
        return plan
    source_vocab = models[source_role]
    if source_vocab.vocabulary is None:
        _plan_without_tokenizers(plan, holders)
        return plan
    usable = source_vocab.usable()
    # by id, as the source's tokenizer files (copied) will keep them: an id without a token
    # stays a row of its own
    plan.tokens = list(source_vocab.by_id())
    source_count = len(plan.tokens)
    past_end = sorted(
        (index, token)
        for token, index in source_vocab.vocabulary.ids.items()
        if token not in usable
    )
    if past_end:
        plan.notes.append(
            f"{source_vocab.label}: its tokenizer has {len(past_end)} token(s) with ids past its "
            f"{source_vocab.rows} embedding rows; they have no row and are left out of the "
            "vocabulary"
        )
    if settings.tokenizer == "union":
        _add_union_tokens(plan, holders)
    _add_override_tokens(plan, recipe, sources)
    rows = max(len(plan.tokens), source_vocab.rows or 0)
    if settings.pad_to_multiple_of:
        rows = math.ceil(rows / settings.pad_to_multiple_of) * settings.pad_to_multiple_of
    plan.rows = rows
    ids = plan.token_ids()
    for holder in holders:
        own = holder.usable()
        if own == usable:  # the same tokenizer: the same ids, then none of the added tokens
            plan.maps[holder.role] = list(range(source_count)) + [-1] * (
                len(plan.tokens) - source_count
            )
            continue
        own_ids = set(own.values())
        plan.maps[holder.role] = [
            own.get(token, -1)
            if token is not None
            # an id without a token matches the same gap of a model (the same tokenizer)
            else (index if index not in own_ids and index < (holder.rows or 0) else -1)
            for index, token in enumerate(plan.tokens)
        ]
    _resolve_overrides(plan, recipe, sources, ids)
    forced = any(override.force for override, _, _ in plan.overrides.values())
    plan.identity = (
        not forced
        and not plan.new_tokens
        and all(
            holder.rows == rows and plan.maps[holder.role] == list(range(len(plan.tokens)))
            for holder in holders
        )
    )
    if not plan.identity:
        _explain_missing(plan, holders)
        _refuse_unalignable(plan, source_vocab, past_end)
    _explain_dropped(plan, holders)
    return plan


def _refuse_unalignable(
    plan: VocabularyPlan, source: ModelVocabulary, past_end: list[tuple[int, str]]
) -> None:
    """Rows can only be aligned to a tokenizer whose every token has a row and whose new tokens
    land where planned: a source tokenizer with tokens past its rows, or with ids without a token
    when tokens are to be added, is refused before any weight is read."""
    if past_end:
        shown = ", ".join(f"{token!r} at {index}" for index, token in past_end[:_SHOWN])
        plan.problems.append(
            (
                "error",
                f"{source.label}: its tokenizer has token(s) past its {source.rows} embedding rows "
                f"({shown}), so rows cannot be aligned to it (the copied tokenizer would encode "
                "them to rows that do not exist); resize its embeddings to its tokenizer "
                "(model.resize_token_embeddings(len(tokenizer))) and re-save it, or take another "
                'model\'s vocabulary (tokenizer = "models[i]")',
            )
        )
    gaps = [index for index, token in enumerate(plan.tokens[: len(plan.tokens)]) if token is None]
    if gaps and plan.new_tokens:
        plan.problems.append(
            (
                "error",
                f"{source.label}: its tokenizer has {len(gaps)} id(s) without a token (first: "
                f"{gaps[0]}), so tokens cannot be added after its last id where their rows are "
                'planned; use tokenizer = "base" or a model\'s vocabulary, without new tokens',
            )
        )


def _explain_dropped(plan: VocabularyPlan, holders: list[ModelVocabulary]) -> None:
    """A warning per model whose tokens the output vocabulary lacks (their rows are left out)."""
    present = set(plan.tokens)
    for holder in holders:
        if holder.assumed:
            continue
        dropped = [t for t in holder.by_id() if t is not None and t not in present]
        if dropped:
            shown = ", ".join(map(repr, dropped[:_SHOWN]))
            more = f" and {len(dropped) - _SHOWN} more" if len(dropped) > _SHOWN else ""
            plan.problems.append(
                (
                    "warning",
                    f"{holder.label} has {len(dropped)} token(s) the output vocabulary lacks "
                    f"({shown}{more}): their rows are left out (tokenizer = {plan.setting}); "
                    'set tokenizer = "union" to keep them',
                )
            )


def _decide_tying(plan: VocabularyPlan, recipe: Recipe, sources: list[Source]) -> None:
    """Whether the output ties its head to its embedding, and the names of both."""
    models = plan.models
    heads = [m.head for m in models.values() if m.head]
    embeddings = [m.embedding for m in models.values() if m.embedding]
    plan.head_name = heads[0] if heads else None
    plan.embedding_name = embeddings[0] if embeddings else None
    # the output's config.json comes from the model whose vocabulary it has
    reference = next(s for s in sources if s.role == plan.tokenizer_from)
    config = reference.checkpoint.config
    donor_tied = config.get("tie_word_embeddings")
    stored_tied = models[reference.role].tied
    if not isinstance(donor_tied, bool):
        donor_tied = stored_tied
    wanted = recipe.tie_word_embeddings
    plan.out_tied = donor_tied if wanted is None else wanted
    plan.tied_changed = wanted is not None and wanted != donor_tied
    tied_inputs = [m for m in models.values() if m.tied]
    untied_inputs = [m for m in models.values() if m.head]
    if not plan.out_tied and plan.head_name is None and plan.embedding_name is not None:
        plan.problems.append(
            (
                "error",
                "merge.tie_word_embeddings = false, but every model ties its head to its "
                "embedding, so there is no head tensor to name; remove the key",
            )
        )
    elif plan.out_tied and untied_inputs:
        names = ", ".join(m.role for m in untied_inputs)
        plan.notes.append(
            f"tied embeddings: the output ties its head to its embedding (as "
            f"{'merge.tie_word_embeddings says' if wanted else reference.label + ' does'}), so "
            f"{plan.head_name} of {names} is not used and one tensor is written; set "
            "merge.tie_word_embeddings = false to merge the heads into an output head of its own"
        )
    elif not plan.out_tied and tied_inputs and untied_inputs:
        names = ", ".join(m.role for m in tied_inputs)
        plan.notes.append(
            f"tied embeddings: {names} tie(s) the head to the embedding; its embedding is merged "
            f"as its {plan.head_name} (the output keeps a separate head, as "
            f"{'merge.tie_word_embeddings says' if wanted is False else reference.label + ' does'})"
        )


def _assume_missing_tokenizers(
    plan: VocabularyPlan, holders: list[ModelVocabulary], source_role: str
) -> None:
    """A model without tokenizer files is taken to have the reference's vocabulary when its rows
    match (as mergekit assumes); under ``union``, and when the rows differ, that is an error."""
    reference = plan.models[source_role]
    for holder in holders:
        if holder.vocabulary is not None or holder.role == source_role:
            continue
        if plan.setting == "union" and reference.vocabulary is not None:
            plan.problems.append(
                (
                    "error",
                    f"{holder.label} has no tokenizer files, so its vocabulary is unknown and a "
                    "union cannot include it; copy the tokenizer files of the model it was "
                    'fine-tuned from into its folder, or use tokenizer = "base"',
                )
            )
        elif holder.rows != reference.rows and reference.vocabulary is not None:
            plan.problems.append(
                (
                    "error",
                    f"vocabulary size mismatch: {holder.label} has {holder.rows} embedding rows, "
                    f"{reference.label} has {reference.rows}, and {holder.role} has no tokenizer "
                    "files to align its rows by token; copy the tokenizer files it was trained "
                    "with into its folder (or, if its extra tokens are not needed, shrink it with "
                    f"resize_token_embeddings({reference.rows}) and re-save it)",
                )
            )
        elif reference.vocabulary is not None:
            holder.vocabulary = reference.vocabulary
            holder.assumed = True


def _plan_without_tokenizers(plan: VocabularyPlan, holders: list[ModelVocabulary]) -> None:
    """No tokenizer to align by: the models must share their row count (merged by index)."""
    sizes = {h.rows for h in holders}
    plan.rows = max((r for r in sizes if r), default=0)
    if len(sizes) > 1:
        listing = ", ".join(f"{h.role} {h.rows}" for h in holders)
        plan.problems.append(
            (
                "error",
                f"vocabulary size mismatch ({listing} rows) and the tokenizer source has no "
                "tokenizer files, so rows cannot be aligned by token; add the tokenizer files "
                "(tokenizer.json ...) to each model's folder",
            )
        )
    source = plan.models[plan.tokenizer_from]
    if plan.setting != "base":
        plan.problems.append(
            (
                "error",
                f"tokenizer = {plan.setting}: {source.label} has no tokenizer files; copy them "
                "into its folder, or choose a model that has them",
            )
        )
    else:
        have = [m.role for m in holders if m.vocabulary is not None]
        if have:
            plan.problems.append(
                (
                    "warning",
                    f"{source.label} has no tokenizer files, so the output will have none; "
                    f'set tokenizer = "{have[0]}" to take that model\'s',
                )
            )


def _add_union_tokens(plan: VocabularyPlan, holders: list[ModelVocabulary]) -> None:
    """mergekit's union order: the base's tokens, then every model's regular tokens the base
    lacks, then every added token (the first definition's flags win); models in recipe order,
    each model's tokens in id order (mergekit's order there follows a hash map)."""
    present = {token for token in plan.tokens if token is not None}
    order = [plan.models[plan.tokenizer_from]] + [
        h for h in holders if h.role != plan.tokenizer_from
    ]
    regular: list[str] = []
    added: dict[str, AddedToken] = {}
    source = order[0].usable()
    for model in order:
        if model.vocabulary is None or model.assumed:
            continue
        if model is not order[0] and model.usable() == source:
            continue  # the source's own vocabulary: nothing new in it
        flags = model.vocabulary.added
        for index, token in enumerate(model.by_id()):
            if token is None:
                continue
            info = flags.get(index)
            if info is None:
                if token not in present:
                    regular.append(token)
            elif token not in added:
                added[token] = info
    for token in dict.fromkeys(regular):
        if token not in present and token not in added:
            plan.tokens.append(token)
            plan.new_tokens.append((token, None))
            present.add(token)
    for token, info in added.items():
        if token not in present:
            plan.tokens.append(token)
            plan.new_tokens.append((token, info))
            present.add(token)


def _add_override_tokens(plan: VocabularyPlan, recipe: Recipe, sources: list[Source]) -> None:
    present = {token for token in plan.tokens if token is not None}
    for override in recipe.tokens:
        if override.token not in present:
            plan.tokens.append(override.token)
            plan.new_tokens.append((override.token, None))
            present.add(override.token)


def _resolve_overrides(
    plan: VocabularyPlan, recipe: Recipe, sources: list[Source], ids: dict[str, int]
) -> None:
    """Each ``[merge.tokens]`` entry → (override, source role, source row), checked against the
    source's vocabulary and rows now, so a typo is an error before any weight is read."""
    for override in recipe.tokens:
        where = f"merge.tokens.{override.token!r}"
        if override.source == "zero":
            plan.overrides[ids[override.token]] = (override, None, None)
            continue
        role = _role_of(override.source, recipe, sources)
        model = plan.models.get(role or "")
        if model is None or role not in plan.maps:
            plan.problems.append(
                (
                    "error",
                    f"{where}.source: {override.source!r} has no vocabulary tensors in this merge; "
                    "name a model that takes part",
                )
            )
            continue
        if override.from_id is not None:
            row: int | None = override.from_id
            if model.rows is not None and override.from_id >= model.rows:
                plan.problems.append(
                    (
                        "error",
                        f"{where}.token_id: {override.from_id} is past the last row of "
                        f"{model.label} ({model.rows - 1})",
                    )
                )
                continue
        else:
            wanted = override.from_token or override.token
            row = model.usable().get(wanted)
            if row is None:
                from mergetui.recipe.validate import did_you_mean

                hint = did_you_mean(wanted, list(model.usable()))
                key = "token" if override.from_token else "source"
                plan.problems.append(
                    (
                        "error",
                        f"{where}.{key}: {model.label} has no token {wanted!r}{hint}; name a "
                        "token it has (token = ...), a row (token_id = ...), or another model",
                    )
                )
                continue
        plan.overrides[ids[override.token]] = (override, role, row)


def _explain_missing(plan: VocabularyPlan, holders: list[ModelVocabulary]) -> None:
    """Warnings for tokens no model has (they get zero rows)."""
    nobody = [
        token
        for index, token in enumerate(plan.tokens)
        if token is not None
        and index not in plan.overrides
        and all(plan.maps[h.role][index] < 0 for h in holders)
    ]
    if nobody:
        plan.problems.append(
            (
                "warning",
                f"{len(nobody)} output token(s) are in no model's embedding and get zero rows: "
                f"{', '.join(map(repr, nobody[:_SHOWN]))}; give them a row in [merge.tokens]",
            )
        )


# -- the summary the check step shows ------------------------------------------------------------


def summary_rows(plan: VocabularyPlan) -> list[tuple[str, str, str, str, str]]:
    """One row per model: role, tokens (rows), how many output tokens it lacks, how many of its
    tokens the output drops, its special tokens."""
    out = set(plan.tokens)
    rows = []
    for role, model in plan.models.items():
        if not model.tensors:
            continue
        vocabulary = model.vocabulary
        if vocabulary is None:
            rows.append((role, f"? ({model.rows} rows)", "no tokenizer files", "", ""))
            continue
        usable = model.usable()
        lacks = sum(
            1
            for index, token in zip(plan.maps.get(role, []), plan.tokens, strict=False)
            if token is not None and index < 0
        )
        dropped = sum(1 for token in usable if token not in out)
        size = f"{len(usable)} ({model.rows} rows)" + (" assumed" if model.assumed else "")
        rows.append(
            (role, size, str(lacks), str(dropped), " ".join(vocabulary.special_tokens[:_SHOWN]))
        )
    return rows


def describe(plan: VocabularyPlan) -> list[str]:
    """What the chosen setting will do, in plain words, for the check step and the model card."""
    lines = []
    if not plan.tokens:
        return ["vocabulary: no tokenizer to align by; rows are merged by index"]
    source = plan.models[plan.tokenizer_from]
    what = {
        "base": f"the vocabulary of {source.label}",
        "union": "the union of the models' vocabularies",
    }.get(plan.setting, f"the vocabulary of {source.label}")
    lines.append(
        f"tokenizer = {plan.setting}: the output has {what}: {plan.size} tokens in "
        f"{plan.rows} embedding rows"
    )
    if plan.identity:
        lines.append("every model has these tokens at the same ids: rows are merged as they are")
        return lines
    if plan.new_tokens:
        shown = ", ".join(repr(t) for t, _ in plan.new_tokens[:_SHOWN])
        more = f" and {len(plan.new_tokens) - _SHOWN} more" if len(plan.new_tokens) > _SHOWN else ""
        lines.append(f"{len(plan.new_tokens)} token(s) added to its tokenizer: {shown}{more}")
    lines.append(
        "rows are aligned by token; a model that lacks a token gets "
        f"{MISSING_TOKEN_RULES[plan.missing_rule]} (missing_tokens = {plan.missing_rule})"
    )
    if plan.overrides:
        lines.append(f"{len(plan.overrides)} token(s) take their row from [merge.tokens]")
    if plan.rows > len(plan.tokens):
        lines.append(
            f"rows {len(plan.tokens)} to {plan.rows - 1} are padding (each model's mean row)"
        )
    return lines


# -- the rows themselves (run time) ---------------------------------------------------------------


class RowAlignment:
    """One vocabulary-indexed tensor's rows put in output order: whole, or a block of output rows
    at a time, with the same bits either way.

    A block of output rows ``[start, end)`` is first *gathered*: each role's stored row for every
    output token it keeps (:meth:`runs` says which stored rows, in runs of consecutive ones; the
    other rows are filled later). :meth:`fill` then puts in the default rows (an override's row, or
    the missing-token rule: ``borrow`` takes the holders' rows, which the block has gathered) and
    :meth:`fill_padding` the padding rows. Two defaults are whole-tensor means, found first
    (:attr:`statistics`): the base's mean row (``missing_tokens = "base_mean"``) and each role's
    mean token row (padding rows). Both are summed per group of :attr:`group` output rows, float64
    across groups in order, so blocks of whole groups sum what the whole tensor sums; a tensor in
    blocks is read once more for each (:meth:`VocabularyPlan.alignment_statistics`).
    """

    def __init__(
        self, plan: VocabularyPlan, roles: list[str], name: str, tail: tuple[int, ...]
    ) -> None:
        import torch

        self.plan = plan
        self.roles = roles
        self.name = name
        self.tail = tail
        self.count = len(plan.tokens)
        self.group = rows_per_chunk(math.prod(tail))
        self.maps = {role: torch.tensor(plan.maps[role], dtype=torch.long) for role in roles}
        forced = torch.zeros(self.count, dtype=torch.bool)
        for index, (override, _, _) in plan.overrides.items():
            forced[index] = override.force
        #: [roles, tokens]: the role has the token
        self.present = torch.stack([self.maps[role] >= 0 for role in roles])
        #: per role, the output tokens whose row is the role's own stored row
        self.keep = {role: (self.maps[role] >= 0) & ~forced for role in roles}
        self.needs_default = (~self.present).any(dim=0) | forced
        self.base = plan.base_role if plan.base_role in roles else None
        self.statistics = plan.alignment_statistics(roles)
        self.base_mean: torch.Tensor | None = None
        self.padding: dict[str, torch.Tensor] = {}
        self._totals: dict[str, torch.Tensor] = {}
        self._summed_rows = 0

    # -- gathering ------------------------------------------------------------------------------
    def runs(self, role: str, start: int, end: int) -> list[tuple[int, int, int]]:
        """The stored rows ``role`` has for output rows ``[start, end)`` (forced ones too: the
        base's mean counts them), as runs of consecutive ones: ``(row in the block, first stored
        row, rows)``."""
        import torch

        stored = self.maps[role][start : min(end, self.count)]
        offsets = (stored >= 0).nonzero().flatten()
        if not len(offsets):
            return []
        rows = stored[offsets]
        begins = torch.ones(len(offsets), dtype=torch.bool)
        begins[1:] = (offsets[1:] != offsets[:-1] + 1) | (rows[1:] != rows[:-1] + 1)
        firsts = begins.nonzero().flatten()
        lengths = torch.diff(firsts, append=torch.tensor([len(offsets)]))
        return list(
            zip(offsets[firsts].tolist(), rows[firsts].tolist(), lengths.tolist(), strict=True)
        )

    def gather(self, role: str, stored: torch.Tensor) -> torch.Tensor:
        """All of ``role``'s rows in output order, from its whole stored tensor (a new tensor of
        ``plan.rows`` rows; the rows still to fill are left as they come)."""
        import torch

        out = torch.empty((self.plan.rows, *self.tail), dtype=stored.dtype, device=stored.device)
        has = (self.maps[role] >= 0).nonzero().flatten().to(stored.device)
        out[has] = stored[self.maps[role].to(stored.device)[has]]
        return out

    # -- the whole-tensor means -----------------------------------------------------------------
    def observe(self, statistic: str, blocks: dict[str, torch.Tensor], start: int) -> None:
        """Add a block's rows to ``statistic``'s sums: for ``"base_mean"`` the gathered block
        (the base's own rows), for ``"padding"`` the block once :meth:`fill` has run."""
        import torch

        end = self._token_end(blocks, start)
        if start % self.group:
            raise ValueError(
                f"{self.name}: a block starts at row {start}, inside a group of {self.group} rows"
            )
        for first in range(start, end, self.group):
            last = min(first + self.group, end)
            if statistic == "base_mean":
                assert self.base is not None
                own = (self.maps[self.base][first:last] >= 0).to(blocks[self.base].device)
                rows = blocks[self.base][first - start : last - start][own]
                self._add(self.base, rows.to(torch.float64).sum(dim=0))
                self._summed_rows += len(rows)
            else:
                for role in self.roles:
                    rows = blocks[role][first - start : last - start]
                    self._add(role, rows.to(torch.float64).sum(dim=0))

    def _token_end(self, blocks: dict[str, torch.Tensor], start: int) -> int:
        """Where the block's token rows end: its end, or the first padding row."""
        return min(start + len(next(iter(blocks.values()))), self.count)

    def _add(self, role: str, total: torch.Tensor) -> None:
        if role in self._totals:
            self._totals[role].add_(total)
        else:
            self._totals[role] = total

    def finish(self, statistic: str, like: torch.Tensor) -> None:
        """Turn ``statistic``'s sums into its mean rows (float32, on ``like``'s device)."""
        import torch

        totals, self._totals = self._totals, {}
        if statistic == "base_mean":
            assert self.base is not None
            if self._summed_rows:
                self.base_mean = (totals[self.base] / self._summed_rows).to(torch.float32)
            return
        for role in self.roles:
            total = totals.get(role)
            if total is None:
                total = torch.zeros(self.tail, dtype=torch.float64, device=like.device)
            self.padding[role] = (total / max(self.count, 1)).to(torch.float32)

    # -- filling --------------------------------------------------------------------------------
    def fill(
        self,
        blocks: dict[str, torch.Tensor],
        start: int,
        stored_row: Callable[[str, int], torch.Tensor],
    ) -> None:
        """Put the default rows into a gathered block of output rows starting at ``start``.
        ``stored_row(role, row)``: one stored row of a role (an override's)."""
        import torch

        end = self._token_end(blocks, start)
        wanted = (self.needs_default[start:end].nonzero().flatten() + start).tolist()
        if not wanted:
            return
        defaults = self._default_rows(blocks, start, wanted, stored_row)
        use = torch.tensor(wanted, dtype=torch.long)
        for role in self.roles:
            takes = ~self.keep[role][use]
            if bool(takes.any()):
                out = blocks[role]
                at = (use[takes] - start).to(out.device)
                out[at] = defaults[takes.to(defaults.device)]

    def fill_padding(self, blocks: dict[str, torch.Tensor], start: int) -> None:
        """Put each role's mean token row into the block's rows past the last token."""
        for role, out in blocks.items():
            first = max(self.count - start, 0)
            if first < len(out):
                out[first:] = self.padding[role]

    def _default_rows(
        self,
        blocks: dict[str, torch.Tensor],
        start: int,
        wanted: list[int],
        stored_row: Callable[[str, int], torch.Tensor],
    ) -> torch.Tensor:
        """The default row of each token in ``wanted`` (an override's row, else the
        missing-token rule), as one [len(wanted), ...] matrix."""
        import torch

        plan = self.plan
        first = blocks[self.roles[0]]
        defaults = torch.zeros((len(wanted), *self.tail), dtype=first.dtype, device=first.device)
        for slot, index in enumerate(wanted):
            override = plan.overrides.get(index)
            if override is not None:
                entry, role, row = override
                if role is None:
                    continue  # zero
                if role not in blocks:
                    raise MergeFailed(
                        f"tensor {self.name}: [merge.tokens] {entry.token!r} takes its row from "
                        f"{role}, which has no input to this tensor"
                    )
                assert row is not None
                defaults[slot] = stored_row(role, row)
                continue
            if plan.missing_rule == "zero":
                continue
            if plan.missing_rule == "base_mean":
                if self.base_mean is not None:
                    defaults[slot] = self.base_mean
                continue
            # borrow: the holders' own rows, which the block has gathered at this token's row
            holders = [self.roles[k] for k in self.present[:, index].nonzero().flatten().tolist()]
            if len(holders) == 1:
                defaults[slot] = blocks[holders[0]][index - start]
            elif not holders:
                continue
            elif self.base is not None and self.base in holders:
                defaults[slot] = blocks[self.base][index - start]
            else:
                total = torch.zeros_like(defaults[slot])
                for role in holders:
                    total += blocks[role][index - start]
                defaults[slot] = total / len(holders)
        return defaults


def align_rows(
    plan: VocabularyPlan, tensors: dict[str, torch.Tensor], name: str
) -> dict[str, torch.Tensor]:
    """Each role's tensor with its rows in output order, ``plan.rows`` long (float32 in, float32
    out): the whole tensor as one block of :class:`RowAlignment`. ``tensors`` holds every input of
    one vocabulary-indexed tensor, in the order the defaults are averaged in (the base first)."""
    roles = list(tensors)
    first = tensors[roles[0]]
    tail = tuple(first.shape[1:])
    for role, tensor in tensors.items():
        if tuple(tensor.shape[1:]) != tail:
            raise MergeFailed(
                f"tensor {name}: {plan.models[role].label} has shape {list(tensor.shape)}, "
                f"the others [{', '.join(map(str, ('rows', *tail)))}]; only the vocabulary "
                "dimension may differ"
            )
    alignment = RowAlignment(plan, roles, name, tail)
    blocks = {role: alignment.gather(role, tensors[role]) for role in roles}

    def stored_row(role: str, row: int) -> torch.Tensor:
        return tensors[role][row]

    if "base_mean" in alignment.statistics:
        alignment.observe("base_mean", blocks, 0)
        alignment.finish("base_mean", first)
    alignment.fill(blocks, 0, stored_row)
    if "padding" in alignment.statistics:
        alignment.observe("padding", blocks, 0)
        alignment.finish("padding", first)
        alignment.fill_padding(blocks, 0)
    return blocks


# -- the layout, changed to match ---------------------------------------------------------------


def apply_to_layout(
    plan: VocabularyPlan,
    tensors: list[PlannedTensor],
    by_role: dict[str, Source],
    out_size: int,
    *,
    base_holds: bool = True,
) -> list[PlannedTensor]:
    """The layout with the vocabulary's changes: the head dropped for a tied output (or added for
    an untied one whose reference is tied), tied inputs reading their embedding as their head,
    aligned tensors sized to the output vocabulary and given the alignment (and, with
    ``base_holds``, the base's tensor, whose rows the defaults use even when the method does not:
    mergekit gathers the base of whole models, not of slices), and vocabulary-indexed tensors
    never byte-copied when aligned."""
    result = []
    head, embedding = plan.head_name, plan.embedding_name
    for tensor in tensors:
        if tensor.name == head and plan.out_tied:
            continue
        result.append(tensor)
        if (
            tensor.name == embedding
            and not plan.out_tied
            and head is not None
            and all(t.name != head for t in tensors)
        ):
            result.append(_head_from(tensor, head))
    for tensor in result:
        if tensor.name == head:
            _read_embedding_for_tied(tensor, plan)
        if not plan.aligned(tensor.name) and tensor.name != head:
            continue
        if plan.aligned(tensor.name):
            _align(tensor, plan, by_role, out_size, base_holds)
        tensor.bytes_in = sum(
            spec.nbytes
            for read in tensor.reads
            if (spec := by_role[read.role].checkpoint.tensors.get(read.name)) is not None
        )
    return result


def _head_from(embedding: PlannedTensor, head: str) -> PlannedTensor:
    """An output head for an untied output whose reference stores none: a copy of the embedding's
    plan under the head's name (inputs renamed to their heads below)."""
    from dataclasses import replace

    return replace(
        embedding,
        name=head,
        inputs=tuple(TensorInput(i.role, head) for i in embedding.inputs),
        base=None if embedding.base is None else TensorInput(embedding.base.role, head),
    )


def _read_embedding_for_tied(tensor: PlannedTensor, plan: VocabularyPlan) -> None:
    embedding = plan.embedding_name
    if embedding is None:
        return

    def fix(read: TensorInput) -> TensorInput:
        model = plan.models.get(read.role)
        if model is not None and model.tied and read.name == tensor.name:
            return TensorInput(read.role, model.embedding or embedding)
        return read

    tensor.inputs = tuple(fix(i) for i in tensor.inputs)
    if tensor.base is not None:
        tensor.base = fix(tensor.base)


def _align(
    tensor: PlannedTensor,
    plan: VocabularyPlan,
    by_role: dict[str, Source],
    out_size: int,
    base_holds: bool,
) -> None:
    if not tensor.merge:  # a byte copy: merge it again (the kernel sees one input, or the same)
        tensor.merge = True
        tensor.copy = len(tensor.inputs) == 1 and tensor.base is None
    tensor.vocabulary = plan
    tensor.shape = (plan.rows, *tensor.shape[1:])
    tensor.bytes_out = math.prod(tensor.shape) * out_size
    roles = {read.role for read in tensor.reads}
    base = plan.base_role
    if base_holds and base is not None and base not in roles and base in by_role:
        name = tensor.name
        model = plan.models[base]
        if name not in model.tensors and model.tied and model.embedding:
            name = model.embedding
        tensor.for_alignment = (TensorInput(base, name),)


def check_template_tokens(template: str, plan: VocabularyPlan) -> list[str]:
    """The chat template's literal special tokens (``<|im_start|>``, ``[INST]``...) that are not
    in the output vocabulary: the merged model could not produce or read them as one token."""
    import re

    if not plan.tokens:
        return []
    found = re.findall(r"<\|[^<>|\s]{1,40}\|>|<[a-z_]{2,30}_[a-z_]{2,30}>|\[/?INST\]", template)
    vocabulary = set(plan.tokens)
    return [token for token in dict.fromkeys(found) if token not in vocabulary]
