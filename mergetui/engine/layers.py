"""Which tensors belong to which transformer layer, read from tensor names alone.

Gradients need each tensor's place among the layers, and slices renumber layers. mergekit reads
both from per-architecture JSON tables; here one rule covers the decoder families mergetui merges
(Llama, Mistral, Qwen, Gemma, Phi, GPT-2, GPT-NeoX, Mixtral, ...): a layer tensor's name contains
``.layers.N.``, ``.h.N.``, ``.blocks.N.`` or ``.layer.N.`` (the first such part counts). Everything
else is a non-layer tensor: before the layers (embeddings) or after them (final norm, ``lm_head``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")
#: Non-layer tensors that come before the layers (mergekit's ``pre_weights``).
_PRE_HINTS = ("embed", "wte", "wpe", "word_embeddings")
#: config.json keys that hold the number of layers, by model family.
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def layer_index(name: str) -> int | None:
    """The layer a tensor belongs to, or None for embeddings, the final norm and the head."""
    match = _LAYER_RE.search(name)
    return int(match.group(1)) if match else None


def with_layer(name: str, index: int) -> str:
    """``name`` with its layer number replaced (``model.layers.3.x`` → ``model.layers.7.x``)."""
    match = _LAYER_RE.search(name)
    if match is None:
        return name
    return name[: match.start(1)] + str(index) + name[match.end(1) :]


def is_pre_weight(name: str) -> bool:
    """Embeddings come before the layers; every other non-layer tensor comes after them."""
    return any(hint in name for hint in _PRE_HINTS)


def layer_count(config: dict[str, Any]) -> int | None:
    for key in LAYER_COUNT_KEYS:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    text = config.get("text_config")
    if isinstance(text, dict):
        return layer_count(text)
    return None


def group_by_layer(names: Iterable[str]) -> tuple[dict[int, list[str]], list[str], list[str]]:
    """Names grouped by layer (each group in the given order), then the pre-layer and post-layer
    names."""
    layers: dict[int, list[str]] = {}
    before: list[str] = []
    after: list[str] = []
    for name in names:
        index = layer_index(name)
        if index is not None:
            layers.setdefault(index, []).append(name)
        elif is_pre_weight(name):
            before.append(name)
        else:
            after.append(name)
    return layers, before, after


def position_in(index: int | None, count: int) -> float:
    """Where a layer sits in a run of ``count`` layers, for gradients: ``index/(count-1)``; 1 for a
    one-layer run and 0 for non-layer tensors (mergekit's rules)."""
    if index is None:
        return 0.0
    if count <= 1:
        return 1.0
    return index / (count - 1)


def per_layer_config(
    config: dict[str, Any], count: int, layers: list[tuple[dict[str, Any], int]]
) -> dict[str, Any]:
    """The config.json changes for an output made of ``layers`` (each ``(source config, source
    layer)``): the layer count, and every list with one item per layer (``layer_types`` and the
    like) rebuilt from the source layers, so a stacked model keeps each layer's own setting."""
    key = next((k for k in LAYER_COUNT_KEYS if k in config), LAYER_COUNT_KEYS[0])
    updates: dict[str, Any] = {key: len(layers)}
    for name, value in config.items():
        if not (isinstance(value, list) and count > 1 and len(value) == count):
            continue
        rebuilt = []
        for source_config, source_layer in layers:
            items = source_config.get(name)
            if not isinstance(items, list) or source_layer >= len(items):
                break
            rebuilt.append(items[source_layer])
        else:
            updates[name] = rebuilt
    return updates
