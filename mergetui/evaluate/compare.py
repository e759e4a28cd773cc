"""The same prompts through several models, answers streamed as they are produced."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mergetui.evaluate.generation import Generation, GenerationSettings, generate
from mergetui.evaluate.models import loaded_in_turn
from mergetui.events import AnswerSummary, ComparedEvent

#: (model name, prompt index, piece of text) as each model answers.
TokenCallback = Callable[[str, int, str], None]


@dataclass
class Comparison:
    models: list[str]
    prompts: list[str]
    answers: dict[tuple[str, int], Generation] = field(default_factory=dict)

    def to_event(self) -> ComparedEvent:
        """The whole comparison as the last line of ``compare --json``."""
        return ComparedEvent(
            models=list(self.models),
            prompts=list(self.prompts),
            answers=[
                AnswerSummary(
                    model=model,
                    prompt=index,
                    text=answer.text,
                    new_tokens=answer.new_tokens,
                    tokens_per_s=round(answer.tokens_per_s, 2),
                    stopped_on_eos=answer.stopped_on_eos,
                )
                for (model, index), answer in self.answers.items()
            ],
        )


def compare(
    names: list[str],
    paths: list[Path],
    prompts: list[str],
    settings: GenerationSettings,
    *,
    device: str,
    on_text: TokenCallback | None = None,
) -> Comparison:
    result = Comparison(list(names), list(prompts))
    with loaded_in_turn(names, paths, device) as models:
        for loaded in models:
            for index, prompt in enumerate(prompts):

                def stream(piece: str, name: str = loaded.name, at: int = index) -> None:
                    if on_text is not None:
                        on_text(name, at, piece)

                result.answers[(loaded.name, index)] = generate(loaded, prompt, settings, stream)
    return result
