"""Where mergetui writes its log, so that no error detail is ever lost (and its other folders).

The log lives in ``$MERGETUI_LOG_DIR`` or ``$XDG_STATE_HOME/mergetui`` (``~/.local/state/mergetui``);
the CLI prints a one-line summary of an error and the path of this file for the full detail.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

LOG_NAME = "mergetui.log"


def log_dir() -> Path:
    explicit = os.environ.get("MERGETUI_LOG_DIR")
    if explicit:
        return Path(explicit).expanduser()
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "mergetui"


def cache_dir() -> Path:
    """Where mergetui keeps what it can rebuild (compiled kernels, the trained demo models):
    ``$XDG_CACHE_HOME/mergetui`` (``~/.cache/mergetui``)."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "mergetui"


def setup_logging(level: int = logging.INFO) -> Path | None:
    """Send the ``mergetui`` logger to the log file; returns its path (None if it cannot be written)."""
    path = log_dir() / LOG_NAME
    logger = logging.getLogger("mergetui")
    logger.setLevel(level)
    for handler in logger.handlers:  # already set up in this process: that file, wherever it is
        if isinstance(handler, logging.FileHandler):
            return Path(handler.baseFilename)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")
    except OSError:
        return None
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    return path
