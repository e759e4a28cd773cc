"""The JSON event contract: every kind round-trips, a missing field fails loudly and in one place,
the README documents exactly the fields the classes have, and real streams follow the grammar."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest
from conftest import ties_recipe

from mergetui.events import (
    SCHEMA_VERSION,
    DoneEvent,
    Event,
    EventFormatError,
    GpuUse,
    PlanEvent,
    StartEvent,
    TensorEvent,
    event_kinds,
    parse_event,
    parse_event_line,
)

README = Path(__file__).resolve().parents[1] / "README.md"


def _sample(annotation: object) -> object:
    """A non-default value of a field's type, so a round trip proves every field survives."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return _sample(next(a for a in typing.get_args(annotation) if a is not type(None)))
    if origin is list:
        return [_sample(typing.get_args(annotation)[0])]
    if origin is dict or annotation is dict:
        return {"key": [1, "two"]}
    if dataclasses.is_dataclass(annotation):
        return _instance(annotation)  # type: ignore[arg-type]
    return {int: 7, float: 2.5, str: "text", bool: True}[annotation]  # type: ignore[index]


def _instance(cls: type) -> object:
    hints = typing.get_type_hints(cls)
    return cls(**{f.name: _sample(hints[f.name]) for f in dataclasses.fields(cls)})


@pytest.mark.parametrize("kind", sorted(event_kinds()))
def test_every_event_kind_round_trips_through_json(kind: str) -> None:
    event = _instance(event_kinds()[kind])
    assert isinstance(event, Event)
    line = event.to_json()
    assert "\n" not in line and f'"event":"{kind}"' in line
    assert parse_event_line(line) == event


def test_a_missing_field_or_an_unknown_kind_is_an_error_that_names_it() -> None:
    data = TensorEvent(**_progress()).to_dict()
    del data["tensors_done"]
    with pytest.raises(EventFormatError, match="tensor event: the 'tensors_done' field is missing"):
        parse_event(data)
    with pytest.raises(EventFormatError, match="unknown event kind 'tensr'"):
        parse_event({**data, "event": "tensr"})
    with pytest.raises(EventFormatError, match="not JSON"):
        parse_event_line("{truncated")


def test_readers_ignore_fields_they_do_not_know() -> None:
    data = {**StartEvent(version="9", command="run").to_dict(), "added_later": 1}
    assert parse_event(data) == StartEvent(version="9", command="run")
    assert StartEvent(version="9", command="run").schema == SCHEMA_VERSION


def test_nested_gpu_readings_come_back_typed() -> None:
    gpus = [GpuUse(index=1, name="H200", used_bytes=5, total_bytes=9)]
    event = parse_event_line(TensorEvent(**_progress(), gpus=gpus).to_json())
    assert isinstance(event, TensorEvent) and event.gpus == gpus


def _progress() -> dict[str, object]:
    return dict(
        tensors_done=1,
        tensors_total=2,
        bytes_read=3,
        bytes_to_read=4,
        bytes_written=5,
        elapsed_s=0.5,
        throughput_bytes_s=6.0,
        rss_bytes=7,
        peak_rss_bytes=8,
    )


def _documented_events() -> dict[str, set[str]]:
    """The README's table of events: `kind` → the fields it lists."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### Events") :]
    section = section[: section.index("\n#", 1)]
    documented: dict[str, set[str]] = {}
    for kind, cells in re.findall(r"^\| `(\w+)` \|(.*)\|$", section, flags=re.MULTILINE):
        fields: set[str] = set()
        for the, name in re.findall(r"(the )?`(\w+)`", cells.split("|")[0]):
            fields |= documented.get(name, {name}) if the else {name}  # "the `tensor` fields"
        documented[kind] = fields
    return documented


def test_the_readme_documents_exactly_the_fields_of_each_event() -> None:
    documented = _documented_events()
    assert set(documented) == set(event_kinds()), "README's event table and mergetui.events"
    for kind, cls in event_kinds().items():
        assert documented[kind] == {f.name for f in dataclasses.fields(cls)}, kind


def test_a_real_merge_stream_follows_the_grammar(tmp_path: Path, models: dict[str, Path]) -> None:
    """start, plan, one tensor event per tensor, a phase, done; every line strictly parsed."""
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(ties_recipe(models, tmp_path / "out"), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "mergetui", "run", str(recipe), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    events = [parse_event_line(line) for line in done.stdout.splitlines()]
    assert isinstance(events[0], StartEvent) and isinstance(events[1], PlanEvent)
    plan = events[1]
    assert plan.ok and not plan.dry_run and plan.report["method"] == "ties"
    tensors = [e for e in events if isinstance(e, TensorEvent)]
    assert [e.tensors_done for e in tensors] == list(range(1, plan.tensors_total + 1))
    assert [e.kind for e in events[2 + len(tensors) :]] == ["phase", "done"]
    final = events[-1]
    assert isinstance(final, DoneEvent) and final.output == str(tmp_path / "out")
    assert final.bytes_read == final.bytes_to_read == plan.bytes_to_read
