"""Token-by-token generation with a KV cache, so answers can be shown as they are produced."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

from mergetui.errors import UsageError
from mergetui.evaluate.models import LoadedModel, torch_thread_limit

#: Below this many parameters (toy models: the demo's, the tests'; the smallest real language
#: models have 100M+), a token is a few dozen ops of microseconds each, which torch still splits
#: across its OpenMP threads. When another process (or this one's UI) keeps a core busy, each
#: op's join waits for a thread that is not running: on 2 cores the demo's 287K-parameter model
#: fell from ~250-350 tokens/s on one thread to 30-100 on two (``bench/bench_generation.py
#: --busy 1``, before and after). Idle, two threads were up to ~20% faster: not worth the risk.
SINGLE_THREAD_BELOW = 10_000_000


@dataclass(frozen=True)
class GenerationSettings:
    """Greedy by default; ``temperature`` > 0 samples (with ``top_p`` and ``seed``)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    chat_template: bool = True


@dataclass
class Generation:
    prompt: str
    text: str
    new_tokens: int
    seconds: float
    stopped_on_eos: bool

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def prompt_ids(loaded: LoadedModel, prompt: str, use_chat_template: bool) -> list[int]:
    """The prompt as token ids: through the tokenizer's chat template when it has one (and it is
    wanted), else the raw text with the tokenizer's usual special tokens."""
    tokenizer = loaded.tokenizer
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    return list(tokenizer(prompt)["input_ids"])


def generate(
    loaded: LoadedModel,
    prompt: str,
    settings: GenerationSettings,
    on_text: Callable[[str], None] | None = None,
) -> Generation:
    """Generate an answer to ``prompt``; ``on_text`` receives each new piece of text."""
    import torch

    tokenizer, model = loaded.tokenizer, loaded.model
    ids = prompt_ids(loaded, prompt, settings.chat_template)
    if not ids:
        raise UsageError(f"{loaded.name}: the prompt {prompt!r} has no tokens")
    eos = _eos_ids(loaded)
    generator = torch.Generator().manual_seed(settings.seed)
    started = time.perf_counter()
    produced: list[int] = []
    shown = ""
    stopped = False
    past: Any = None
    step_input = torch.tensor([ids], device=loaded.device)
    with torch.inference_mode(), _threads_for(loaded):
        for _ in range(settings.max_new_tokens):
            out = model(input_ids=step_input, cache=past, use_cache=True)
            past = out.cache
            token = _next_token(out.logits[0, -1].float().cpu(), settings, generator)
            if token in eos:
                stopped = True
                break
            produced.append(token)
            text = tokenizer.decode(produced, skip_special_tokens=True)
            if on_text is not None and len(text) > len(shown):
                on_text(text[len(shown) :])
            shown = text
            step_input = torch.tensor([[token]], device=loaded.device)
    return Generation(prompt, shown, len(produced), time.perf_counter() - started, stopped)


def _threads_for(loaded: LoadedModel) -> AbstractContextManager[Any]:
    """One CPU thread for a toy model on the CPU (see ``SINGLE_THREAD_BELOW``); else torch's
    own choice."""
    if loaded.device != "cpu":
        return nullcontext()
    parameters = sum(p.numel() for p in loaded.model.parameters())
    return torch_thread_limit(1) if parameters < SINGLE_THREAD_BELOW else nullcontext()


def _eos_ids(loaded: LoadedModel) -> set[int]:
    ids: set[int] = set()
    for source in (
        loaded.tokenizer.eos_token_id,
        getattr(loaded.model.generation_config, "eos_token_id", None),
    ):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    return ids


def _next_token(logits: Any, settings: GenerationSettings, generator: Any) -> int:
    import torch

    if settings.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / settings.temperature, dim=-1)
    if settings.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, 0) - sorted_probs < settings.top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        probs /= probs.sum()
    return int(torch.multinomial(probs, 1, generator=generator))
