"""What every command shares: the consoles, and one way to fail (one line, log file, exit code)."""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

from mergetui.errors import EXIT_INTERRUPTED, EXIT_MERGE_FAILED, MergeTuiError

log = logging.getLogger("mergetui.cli")
console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)
#: Where this process logs (set by ``main``), named in failure messages.
log_path: list[Path] = []
_print_lock = threading.Lock()

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON (lines).")]


def fail(message: str, code: int, *, as_json: bool = False) -> NoReturn:
    if as_json:
        print(json.dumps({"event": "error", "message": message, "exit_code": code}), flush=True)
    err_console.print(f"[bold red]error:[/bold red] {message}", soft_wrap=True)
    if code == EXIT_MERGE_FAILED and log_path:
        err_console.print(f"details: {log_path[0]}")
    raise typer.Exit(code)


@contextmanager
def guard(as_json: bool = False) -> Iterator[None]:
    """Map every failure to a one-line message, the log file and the documented exit code."""
    try:
        yield
    except MergeTuiError as exc:
        log.error("%s", exc, exc_info=exc.exit_code == EXIT_MERGE_FAILED)
        fail(str(exc), exc.exit_code, as_json=as_json)
    except KeyboardInterrupt:
        log.warning("interrupted")
        fail("interrupted", EXIT_INTERRUPTED, as_json=as_json)
    except typer.Exit:
        raise
    except Exception as exc:
        log.exception("unexpected error")
        fail(f"unexpected {type(exc).__name__}: {exc}", EXIT_MERGE_FAILED, as_json=as_json)


def print_download_event(progress: Any) -> None:
    """A Hub download's progress as one JSON line (``--json``), like the merge's events. Files
    download on several threads: the lock keeps each line whole."""
    event = {"event": "download", **dataclasses.asdict(progress), "eta_s": progress.eta_s}
    line = json.dumps(event)
    with _print_lock:
        print(line, flush=True)
