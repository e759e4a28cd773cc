"""A real Hub-compatible server on loopback for the Hub tests: olah, plus a thin front for its gaps.

olah (a self-hosted Hub mirror, installed in its own venv by ``.ci/run``) serves git repositories
made here as Hub model repos over the HTTP API huggingface_hub calls. In front of it sits a small
HTTP server that:

- answers ``GET /api/models?search=...`` (olah has no listing route) from the repos it serves, in
  the Hub's JSON shape, so ``HfApi.list_models`` runs its real code path;
- honours ``Range`` on file downloads (olah answers 200 with the whole file), as the Hub does, so
  resumed downloads and ranged header reads are exercised;
- can stall one file after a number of bytes, so a test can kill a download half-way, or cut
  the connection once, as a flaky network does;
- can answer for chosen repos as the Hub does for gated repos without a token (401 GatedRepo);
- records every request, so tests can check what the client asked for.

Everything else is passed to olah unchanged. ``HF_ENDPOINT`` points at the front.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import parse_qs, urlsplit

GIT_ENV = {
    "GIT_AUTHOR_NAME": "mergetui tests",
    "GIT_AUTHOR_EMAIL": "tests@mergetui.invalid",
    "GIT_COMMITTER_NAME": "mergetui tests",
    "GIT_COMMITTER_EMAIL": "tests@mergetui.invalid",
    "GIT_AUTHOR_DATE": "2026-01-01T00:00:00Z",
    "GIT_COMMITTER_DATE": "2026-01-01T00:00:00Z",
}
_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


def olah_cli() -> str | None:
    """Where olah's command is: ``$MERGETUI_OLAH_CLI``, the CI venv, or PATH."""
    candidates = [
        os.environ.get("MERGETUI_OLAH_CLI"),
        "/tmp/mergetui-olah-venv/bin/olah-cli",
        shutil.which("olah-cli"),
    ]
    return next((c for c in candidates if c and Path(c).exists()), None)


def hub_unavailable(reason: str) -> NoReturn:
    """Skip a Hub test loudly, or fail it where CI requires the Hub tests to run."""
    import pytest

    message = f"SKIPPED LOUDLY: {reason}"
    if os.environ.get("MERGETUI_REQUIRE_HUB_SERVER"):
        pytest.fail(message)
    pytest.skip(message)


def require_olah() -> None:
    if olah_cli() is None:
        hub_unavailable(
            "the Hub tests need olah (a Hub-compatible server): python -m venv "
            "/tmp/mergetui-olah-venv && /tmp/mergetui-olah-venv/bin/pip install olah"
        )


@contextmanager
def running(server: HubServer) -> Iterator[HubServer]:
    """``server`` started for the block and stopped after it (a module fixture's body)."""
    try:
        server.start()
    except RuntimeError as exc:
        hub_unavailable(f"the Hub test server did not start: {exc}")
    try:
        yield server
    finally:
        server.stop()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def git(folder: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", *args],
        cwd=folder,
        env={**os.environ, **GIT_ENV},
        check=True,
        capture_output=True,
        text=True,
    )
    return done.stdout.strip()


@dataclass
class RepoMeta:
    """What the search front reports about a repo (the Hub's listing fields)."""

    downloads: int = 0
    pipeline_tag: str | None = "text-generation"
    library_name: str | None = "transformers"
    tags: list[str] = field(default_factory=list)


class HubServer:
    """olah plus the front, serving ``<root>/mirrors/models/<org>/<name>`` git repos."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.mirrors = root / "mirrors"
        self.meta: dict[str, RepoMeta] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self.gated: set[str] = set()
        self.stall_file: str | None = None
        self.stall_after = 0
        self.release_stall = threading.Event()
        self.cut_file: str | None = None  # cut the connection once, after cut_after bytes
        self.cut_after = 0
        self._in_flight = 0
        self._in_flight_changed = threading.Condition()
        self._olah: subprocess.Popen[bytes] | None = None
        self._front: ThreadingHTTPServer | None = None

    # -- repos -------------------------------------------------------------------------------
    def add_repo(self, repo_id: str, source: Path, meta: RepoMeta | None = None) -> str:
        """Commit the files of ``source`` as repo ``repo_id`` (branch main); return the commit."""
        folder = self.mirrors / "models" / repo_id
        if folder.exists():
            shutil.rmtree(folder)
        shutil.copytree(source, folder)
        git(folder, "init", "-q", "-b", "main")
        git(folder, "add", "-A")
        git(folder, "commit", "-q", "-m", f"add {repo_id}")
        self.meta[repo_id] = meta or RepoMeta()
        return git(folder, "rev-parse", "HEAD")

    def commit_change(self, repo_id: str, filename: str, text: str, tag: str | None = None) -> str:
        folder = self.mirrors / "models" / repo_id
        (folder / filename).write_text(text)
        git(folder, "add", "-A")
        git(folder, "commit", "-q", "-m", f"change {filename}")
        if tag:
            git(folder, "tag", tag)
        return git(folder, "rev-parse", "HEAD")

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> str:
        """Start olah and the front; return the endpoint (``http://127.0.0.1:PORT``)."""
        cli = olah_cli()
        if cli is None:
            raise RuntimeError(
                "olah is not installed: `python -m venv /tmp/mergetui-olah-venv && "
                "/tmp/mergetui-olah-venv/bin/pip install olah` (or set MERGETUI_OLAH_CLI)"
            )
        if shutil.which("git") is None:
            raise RuntimeError("git is needed to serve test repos with olah")
        self.mirrors.mkdir(parents=True, exist_ok=True)
        olah_port = free_port()
        config = self.root / "olah.toml"
        config.write_text(
            "[basic]\n"
            'host = "127.0.0.1"\n'
            f"port = {olah_port}\n"
            f'repos-path = "{self.root / "olah-cache"}"\n'
            'hf-scheme = "http"\n'
            'hf-netloc = "127.0.0.1:9"\n'
            'hf-lfs-netloc = "127.0.0.1:9"\n'
            'mirror-scheme = "http"\n'
            f'mirror-netloc = "127.0.0.1:{olah_port}"\n'
            f'mirror-lfs-netloc = "127.0.0.1:{olah_port}"\n'
            f'mirrors-path = ["{self.mirrors}"]\n'
            "\n[accessibility]\noffline = true\n"
        )
        log = (self.root / "olah.log").open("wb")
        self._olah = subprocess.Popen(
            [cli, "--config", str(config), "--log-path", str(self.root / "olah-logs")],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.olah_address = ("127.0.0.1", olah_port)
        deadline = time.monotonic() + 60
        while True:
            if self._olah.poll() is not None:
                raise RuntimeError(f"olah exited at start; see {self.root / 'olah.log'}")
            try:
                with socket.create_connection(self.olah_address, timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("olah did not start listening within 60 s") from None
                time.sleep(0.2)
        self._front = ThreadingHTTPServer(("127.0.0.1", 0), _FrontHandler)
        self._front.daemon_threads = True
        self._front.hub = self  # type: ignore[attr-defined]
        threading.Thread(target=self._front.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self._front.server_address[1]}"
        return self.endpoint

    def settle(self, timeout_s: float = 120.0) -> None:
        """Undo a test's stall or cut and wait until every request still being answered is done.

        A test that kills its client can leave a request in the front that reaches the stall or
        cut check late; without this, that request would take the next test's cut. The timeout
        only catches a hang."""
        self.stall_file = None
        self.cut_file = None
        self.release_stall.set()
        with self._in_flight_changed:
            if not self._in_flight_changed.wait_for(lambda: self._in_flight == 0, timeout_s):
                raise RuntimeError(f"{self._in_flight} requests to the test Hub never finished")

    def request_started(self) -> None:
        with self._in_flight_changed:
            self._in_flight += 1

    def request_finished(self) -> None:
        with self._in_flight_changed:
            self._in_flight -= 1
            self._in_flight_changed.notify_all()

    def stop(self) -> None:
        self.release_stall.set()
        if self._front is not None:
            self._front.shutdown()
            self._front.server_close()
            self._front = None
        if self._olah is not None and self._olah.poll() is None:
            os.killpg(self._olah.pid, signal.SIGTERM)
            try:
                self._olah.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self._olah.pid, signal.SIGKILL)
                self._olah.wait()
        self._olah = None

    # -- what the front serves ---------------------------------------------------------------
    def listing(self, query: str, limit: int) -> list[dict[str, Any]]:
        found = []
        for repo_id, meta in self.meta.items():
            if query.lower() not in repo_id.lower():
                continue
            found.append(
                {
                    "_id": repo_id,
                    "id": repo_id,
                    "modelId": repo_id,
                    "downloads": meta.downloads,
                    "likes": 0,
                    "private": False,
                    "pipeline_tag": meta.pipeline_tag,
                    "library_name": meta.library_name,
                    "tags": meta.tags,
                    "createdAt": "2026-01-01T00:00:00.000Z",
                    "lastModified": "2026-01-01T00:00:00.000Z",
                    **self._safetensors_summary(repo_id),
                }
            )
        found.sort(key=lambda m: -int(m["downloads"]))
        return found[:limit]

    def _safetensors_summary(self, repo_id: str) -> dict[str, Any]:
        """The Hub's ``safetensors`` listing field: parameter counts from the files' headers."""
        counts: dict[str, int] = {}
        for path in (self.mirrors / "models" / repo_id).glob("*.safetensors"):
            with path.open("rb") as handle:
                size = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(size))
            for name, entry in header.items():
                if name != "__metadata__":
                    count = 1
                    for dim in entry["shape"]:
                        count *= dim
                    counts[entry["dtype"]] = counts.get(entry["dtype"], 0) + count
        if not counts:
            return {}
        return {"safetensors": {"parameters": counts, "total": sum(counts.values())}}


class _FrontHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        return

    @property
    def hub(self) -> HubServer:
        return self.server.hub  # type: ignore[attr-defined, no-any-return]

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._handle("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._handle("HEAD")

    def _handle(self, method: str) -> None:
        self.hub.request_started()
        try:
            self._answer(method)
        finally:
            self.hub.request_finished()

    def _answer(self, method: str) -> None:
        parts = urlsplit(self.path)
        self.hub.requests.append((method, self.path, self.headers.get("Range")))
        if parts.path.rstrip("/") == "/api/models":
            query = parse_qs(parts.query)
            body = json.dumps(
                self.hub.listing(query.get("search", [""])[0], int(query.get("limit", ["50"])[0]))
            ).encode()
            self._send(200, {"Content-Type": "application/json"}, body, method)
            return
        gated = next((r for r in self.hub.gated if f"/{r}/" in parts.path + "/"), None)
        if gated and "authorization" not in {k.lower() for k in self.headers}:
            headers = {"X-Error-Code": "GatedRepo", "X-Error-Message": f"{gated} is gated"}
            self._send(401, headers, b'{"error": "gated"}', method)
            return
        upstream = http.client.HTTPConnection(*self.hub.olah_address, timeout=60)
        headers = {
            k: v
            for k, v in self.headers.items()
            if k.lower() not in _HOP_HEADERS and k.lower() not in ("range", "accept-encoding")
        }
        upstream.request(method, self.path, headers=headers)
        reply = upstream.getresponse()
        body = reply.read()
        upstream.close()
        out_headers = {k: v for k, v in reply.getheaders() if k.lower() not in _HOP_HEADERS}
        status = reply.status
        total = int(reply.getheader("Content-Length") or len(body))
        wanted = self.headers.get("Range")
        if "/resolve/" in parts.path and status == 200 and wanted and wanted.startswith("bytes="):
            start_text, _, end_text = wanted[len("bytes=") :].partition("-")
            start = int(start_text or 0)
            end = min(int(end_text), total - 1) if end_text else total - 1
            out_headers["Content-Range"] = f"bytes {start}-{end}/{total}"
            status = 206
            body = body[start : end + 1] if method == "GET" else b""
            total = end - start + 1
        stall = self.hub.stall_file
        if method == "GET" and stall and parts.path.endswith("/" + stall) and status == 200:
            self._send_partial(out_headers, body, self.hub.stall_after, wait=True)
            return
        cut = self.hub.cut_file
        if method == "GET" and cut and parts.path.endswith("/" + cut) and status == 200:
            self.hub.cut_file = None  # once
            self._send_partial(out_headers, body, self.hub.cut_after, wait=False)
            return
        self._send(status, out_headers, body, method, length=total)

    def _send(
        self,
        status: int,
        headers: dict[str, str],
        body: bytes,
        method: str,
        length: int | None = None,
    ) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if method == "GET":
            self.wfile.write(body)

    def _send_partial(self, headers: dict[str, str], body: bytes, count: int, wait: bool) -> None:
        """Announce the whole body, send ``count`` bytes, (hang until released,) drop the line."""
        self.send_response(200)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:count])
        self.wfile.flush()
        if wait:
            self.hub.release_stall.wait(120)
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)
