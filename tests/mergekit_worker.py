"""Runs real mergekit merges for the tests, one per request, in mergekit's own venv.

Started by ``tests/mergekit_ref.py`` with the mergekit venv's python (never imported by pytest nor
by mergetui). Protocol, one JSON object per line:

- at start, after the imports: ``{"ready": true, "versions": {"mergekit": ..., "torch": ...}}``;
- request on stdin: ``{"config": "<mergekit YAML>", "out": "/path", "options": {...}}``, where
  ``options`` overrides fields of :class:`mergekit.options.MergeOptions`;
- reply on stdout: ``{"ok": true}`` or ``{"ok": false, "error": "<traceback>"}``.

A merge runs exactly as ``mergekit-yaml CONFIG OUT`` would (``MergeConfiguration.model_validate``
of the parsed YAML, ``run_merge`` with the YAML text as the card's source), on the CPU, with the
options below. Everything mergekit prints goes to stderr: stdout carries only the replies.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from importlib.metadata import version
from typing import Any

#: MergeOptions for every merge unless a request overrides them: the CPU only, a tokenizer copied
#: like mergetui does, eager unpickling, a fixed seed, no progress bars, no "crimes".
DEFAULT_OPTIONS: dict[str, Any] = {
    "device": "cpu",
    "cuda": False,
    "copy_tokenizer": True,
    "lazy_unpickle": False,
    "random_seed": 0,
    "allow_crimes": False,
    "quiet": True,
}


def merge(request: dict[str, Any]) -> None:
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.io.tasks import LoaderCache
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    options = MergeOptions(**{**DEFAULT_OPTIONS, **request.get("options", {})})
    options.apply_global_options()  # as mergekit-yaml does: logging, seed, threads
    text = request["config"]
    config = MergeConfiguration.model_validate(yaml.safe_load(text))
    try:
        run_merge(config, str(request["out"]), options=options, config_source=text)
    finally:
        # The loader cache is a process-wide singleton keyed by model path: drop it, so a later
        # request never reads a model through a loader opened for an earlier one.
        cache = LoaderCache()
        cache.flush_all()
        cache.loaders.clear()


def main() -> None:
    # Keep the protocol channel to ourselves: mergekit, transformers and tqdm write to stdout.
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())

    import mergekit.merge  # noqa: F401 - pay the imports (torch, transformers) once, up front

    versions = {name: version(name) for name in ("mergekit", "torch", "transformers")}
    replies.write(json.dumps({"ready": True, "versions": versions}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            merge(json.loads(line))
            reply: dict[str, Any] = {"ok": True}
        except Exception:  # noqa: BLE001 - every failure goes back to the test, with its traceback
            reply = {"ok": False, "error": traceback.format_exc()}
        sys.stderr.flush()
        replies.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    main()
