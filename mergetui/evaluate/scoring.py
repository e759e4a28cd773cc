"""Scores: accuracy of batched greedy answers, and perplexity of plain text."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from mergetui.evaluate.generation import prompt_ids
from mergetui.evaluate.models import LoadedModel
from mergetui.evaluate.tasks import Task, is_correct

ProgressCallback = Callable[[str, str, int, int], None]  # model, task, done, total


@dataclass
class Score:
    model: str
    task: str
    metric: str
    value: float
    count: int


def score_task(
    loaded: LoadedModel,
    task: Task,
    *,
    batch_size: int = 16,
    limit: int | None = None,
    chat_template: bool = True,
    max_new_tokens: int = 32,
    on_progress: ProgressCallback | None = None,
) -> Score:
    if task.kind == "answers":
        return _accuracy(
            loaded, task, batch_size, limit, chat_template, max_new_tokens, on_progress
        )
    return _perplexity(loaded, task, batch_size, limit, on_progress)


def _accuracy(
    loaded: LoadedModel,
    task: Task,
    batch_size: int,
    limit: int | None,
    chat_template: bool,
    max_new_tokens: int,
    on_progress: ProgressCallback | None,
) -> Score:
    import torch

    examples = task.examples[:limit] if limit else task.examples
    tokenizer, model = loaded.tokenizer, loaded.model
    pad = tokenizer.pad_token_id
    correct = 0
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        prompts = [prompt_ids(loaded, e.prompt, chat_template) for e in batch]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, tokens in enumerate(prompts):  # left padding: answers start at one column
            ids[row, width - len(tokens) :] = torch.tensor(tokens)
            mask[row, width - len(tokens) :] = 1
        longest = max(
            len(tokenizer(e.answer, add_special_tokens=False)["input_ids"]) for e in batch
        )
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids.to(loaded.device),
                attention_mask=mask.to(loaded.device),
                max_new_tokens=min(max_new_tokens, longest + 8),
                do_sample=False,
                pad_token_id=pad,
            )
        for example, row in zip(batch, out[:, width:].tolist(), strict=True):
            correct += is_correct(example, tokenizer.decode(row, skip_special_tokens=True))
        if on_progress is not None:
            on_progress(
                loaded.name, task.name, min(start + batch_size, len(examples)), len(examples)
            )
    return Score(loaded.name, task.name, "accuracy", correct / len(examples), len(examples))


def _perplexity(
    loaded: LoadedModel,
    task: Task,
    batch_size: int,
    limit: int | None,
    on_progress: ProgressCallback | None,
) -> Score:
    """exp(mean next-token loss) over non-overlapping windows of the model's context length."""
    import torch

    tokens = loaded.tokenizer(task.text)["input_ids"]
    context = int(getattr(loaded.model.config, "max_position_embeddings", 1024) or 1024)
    window = max(2, min(context, 1024))
    windows = [tokens[i : i + window] for i in range(0, len(tokens) - 1, window)]
    windows = [w for w in windows if len(w) > 1]
    if limit:
        windows = windows[:limit]
    total_loss, total_tokens = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        width = max(len(w) for w in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, w in enumerate(batch):
            ids[row, : len(w)] = torch.tensor(w)
            mask[row, : len(w)] = 1
        with torch.inference_mode():
            logits = loaded.model(
                input_ids=ids.to(loaded.device), attention_mask=mask.to(loaded.device)
            ).logits.float()
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            ids[:, 1:].reshape(-1).to(logits.device),
            reduction="none",
        ).view(len(batch), width - 1)
        valid = mask[:, 1:].to(losses.device).float()
        total_loss += float((losses * valid).sum())
        total_tokens += int(valid.sum())
        if on_progress is not None:
            on_progress(loaded.name, task.name, min(start + batch_size, len(windows)), len(windows))
    return Score(
        loaded.name, task.name, "perplexity", math.exp(total_loss / total_tokens), total_tokens
    )
