"""``mergetui hub``: search, inspect, list the cache and download, over :mod:`mergetui.sources.hub`."""

from __future__ import annotations

import dataclasses
import json
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from mergetui.cli.output import (
    JsonOpt,
    console,
    emit,
    guard,
    print_download_event,
    start_stream,
)
from mergetui.cli.render import Cell, Column, count_or_unknown, print_rows
from mergetui.errors import SourceError
from mergetui.events import DownloadedEvent
from mergetui.units import format_bytes

hub_app = typer.Typer(
    help="Find, inspect and download models from the Hub (or the mirror in HF_ENDPOINT).",
    no_args_is_help=True,
)
RepoArg = Annotated[str, typer.Argument(help="Model id: org/name or org/name@revision.")]


def _hub_ref(text: str) -> Any:
    from mergetui.sources.refs import parse_hub_id

    ref = parse_hub_id(text)
    if ref is None:
        raise SourceError(f"{text!r} is not a Hub model id; write it as org/name or org/name@rev")
    return ref


@hub_app.command()
def search(
    query: Annotated[str, typer.Argument(help="Text to look for in model ids.")],
    limit: Annotated[int, typer.Option(help="At most this many models.", min=1)] = 20,
    as_json: JsonOpt = False,
) -> None:
    """Search models by id, most downloaded first.

    Piped (or too narrow for the table): one tab-separated line per model, the id first, uncut.
    Fields: id, task, library, parameters, last modified, downloads.
    """
    from mergetui.sources import hub

    with guard(as_json):
        hits = hub.search(query, limit)
    if as_json:
        print(json.dumps([dataclasses.asdict(h) for h in hits], indent=2))
        return
    if not hits:
        console.print(f"no models match {query!r} at {hub.endpoint()}")
        return
    columns = [  # the id is never cut: at 80 columns, the others go, library first
        Column("model"),
        Column("task", drop=3),
        Column("library", drop=1),
        Column("parameters", "right", drop=4),
        Column("last modified", drop=2),
        Column("downloads", "right", drop=5),
    ]
    rows = [
        [
            hit.repo_id,
            hit.pipeline_tag or "",
            hit.library or "",
            count_or_unknown(hit.parameters),
            (hit.last_modified or "")[:10],
            count_or_unknown(hit.downloads),
        ]
        for hit in hits
    ]
    title = f"{len(hits)} models matching {query!r} at {hub.endpoint()}"
    print_rows(console, columns, rows, title)


@hub_app.command()
def info(repo: RepoArg, as_json: JsonOpt = False) -> None:
    """A model's commit, files and sizes, architecture and weight format; no weight is fetched."""
    from mergetui.sources import hub
    from mergetui.sources.hub_summary import info_rows

    with guard(as_json):
        details = hub.repo_info(_hub_ref(repo))
    summary = {
        "repo_id": details.repo_id,
        "revision": details.revision,
        "commit": details.commit,
        "architectures": details.architectures,
        "model_type": details.model_type,
        "weight_format": details.weight_format,
        "weight_bytes": details.weight_bytes,
        "is_adapter": details.is_adapter,
        "adapter_base": details.adapter_base,
        "needs_custom_code": details.needs_custom_code,
        "files": [dataclasses.asdict(f) for f in details.files],
        "needed_files": details.needed_files(),
    }
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    for row in info_rows(details):  # the same lines as the TUI's models step
        line = Text(f"{row.label}: ", "bold") + Text(row.text, "yellow" if row.warning else "")
        console.print(line, soft_wrap=True)
    needed = set(details.needed_files())
    table = Table(title="files (● = downloaded for a merge)")
    table.add_column("")
    table.add_column("file", no_wrap=True)
    table.add_column("size", justify="right")
    for file in details.files:
        shown = format_bytes(file.size) if file.size is not None else "?"
        table.add_row("●" if file.path in needed else "", file.path, shown)
    console.print(table)


@hub_app.command()
def cached(as_json: JsonOpt = False) -> None:
    """Models already in the local HF cache, and whether each can be merged offline.

    Piped (or too narrow for the table): one tab-separated line per revision, the id first.
    Fields: id, revision, refs, size, offline.
    """
    from mergetui.sources import hub

    with guard(as_json):
        models = hub.cached_models()
    if as_json:
        rows = [
            {
                **dataclasses.asdict(m),
                "revisions": [
                    {**dataclasses.asdict(r), "usable_offline": r.usable_offline}
                    for r in m.revisions
                ],
            }
            for m in models
        ]
        print(json.dumps(rows, indent=2))
        return
    if not models:
        console.print("the HF cache holds no models")
        return
    columns = [
        Column("model"),
        Column("revision", drop=2),
        Column("refs", drop=1),
        Column("size", "right", drop=3),
        Column("offline", drop=4),
    ]
    lines: list[list[Cell]] = [
        [
            model.repo_id,
            revision.commit[:12],
            ", ".join(revision.refs),
            format_bytes(revision.size_bytes),
            Text("usable", "green") if revision.usable_offline else Text("incomplete"),
        ]
        for model in models
        for revision in model.revisions
    ]
    print_rows(console, columns, lines, "models in the local HF cache")


@hub_app.command()
def download(repo: RepoArg, as_json: JsonOpt = False) -> None:
    """Download what a merge needs (config, tokenizer, safetensors) into the HF cache; resumes."""
    from mergetui.cli.render import DownloadView
    from mergetui.sources import hub

    if as_json:
        start_stream("hub download")
    with guard(as_json):
        ref = _hub_ref(repo)
        if as_json:
            folder = hub.download(ref, print_download_event)
        else:
            with DownloadView(console) as downloads:
                folder = hub.download(ref, downloads.update)
    if as_json:
        emit(DownloadedEvent(repo_id=ref.repo_id or repo, path=str(folder)))
    else:
        console.print(f"in the cache: {folder}")
