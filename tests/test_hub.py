"""Hub sources against a real Hub-compatible server on loopback (olah + a thin front; see
``hubserver.py``). Every test drives the real CLI, so the real huggingface_hub client path runs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import save_llama
from hubserver import HubServer, RepoMeta, require_olah, running

EXE = [sys.executable, "-m", "mergetui"]
SECRET = "hf_mergetuiTestTokenThatMustNeverAppear"


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path]) -> Iterator[HubServer]:
    require_olah()
    root = tmp_path_factory.mktemp("hub")
    server = HubServer(root)
    repos = _build_repos(root / "build", models)
    for repo_id, (folder, downloads) in repos.items():
        server.add_repo(repo_id, folder, RepoMeta(downloads=downloads))
    server.tag_commit = server.commit_change(  # type: ignore[attr-defined]
        "acme/tiny-code", "NOTES.md", "tagged release\n", tag="v1"
    )
    server.commit_change("acme/tiny-code", "NOTES.md", "after the tag\n")
    server.gated.add("acme/tiny-gated")
    with running(server):
        yield server


def _build_repos(root: Path, models: dict[str, Path]) -> dict[str, tuple[Path, int]]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    repos: dict[str, tuple[Path, int]] = {
        "acme/tiny-base": (models["base"], 500),
        "acme/tiny-code": (models["ft_a"], 300),
        "acme/tiny-math": (models["ft_c"], 100),
        "acme/tiny-qwen": (models["qwen2"], 50),
        "acme/tiny-gated": (models["ft_a"], 10),
    }
    binary = root / "tiny-bin"  # what older checkpoints look like: pytorch_model.bin only
    binary.mkdir(parents=True)
    shutil.copy(models["ft_c"] / "config.json", binary / "config.json")
    torch.save(
        AutoModelForCausalLM.from_pretrained(models["ft_c"]).state_dict(),
        binary / "pytorch_model.bin",
    )
    repos["acme/tiny-bin"] = (binary, 20)
    torch.manual_seed(0)
    adapter = get_peft_model(
        AutoModelForCausalLM.from_pretrained(models["base"]),
        LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    )
    adapter.peft_config["default"].base_model_name_or_path = "acme/tiny-base"
    adapter.save_pretrained(root / "tiny-lora")
    repos["acme/tiny-lora"] = (root / "tiny-lora", 30)
    custom = root / "tiny-custom"
    shutil.copytree(models["ft_a"], custom)
    config = json.loads((custom / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomModel"}
    (custom / "config.json").write_text(json.dumps(config))
    repos["acme/tiny-custom"] = (custom, 5)
    no_config = root / "no-config"
    no_config.mkdir()
    shutil.copy(models["ft_a"] / "model.safetensors", no_config / "model.safetensors")
    (no_config / "README.md").write_text("weights without a config\n")
    repos["acme/no-config"] = (no_config, 1)
    big = save_llama(  # two ~12 MB shards: huggingface_hub writes in 10 MiB chunks
        root / "big",
        seed=7,
        dtype="float32",
        vocab_size=12000,
        hidden_size=256,
        intermediate_size=64,
        num_hidden_layers=1,
        tie_word_embeddings=False,
    )
    AutoModelForCausalLM.from_pretrained(big).save_pretrained(big, max_shard_size="13MB")
    (big / "model.safetensors").unlink(missing_ok=True)
    repos["acme/big"] = (big, 2)
    return repos


@pytest.fixture(autouse=True)
def _settled_hub(hub: HubServer) -> Iterator[None]:
    """Each test starts on a Hub with no stall, no cut and no request from an earlier test."""
    hub.settle()
    yield
    hub.settle()


@pytest.fixture
def hf_home(tmp_path: Path) -> Path:
    return tmp_path / "hf-home"


def _hub_env(
    hub: HubServer, hf_home: Path, logs: Path, offline: bool, endpoint: str | None
) -> dict[str, str]:
    """The environment of a process talking to the test Hub, with a fresh cache and a token that
    must never be shown."""
    env = {
        **os.environ,
        "HF_ENDPOINT": endpoint or hub.endpoint,
        "HF_HOME": str(hf_home),
        "HF_HUB_OFFLINE": "1" if offline else "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_TOKEN": SECRET,
        "MERGETUI_LOG_DIR": str(logs),
        "COLUMNS": "160",
    }
    env.pop("HF_HUB_CACHE", None)
    return env


@pytest.fixture
def cli(
    hub: HubServer, hf_home: Path, tmp_path: Path
) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run ``mergetui`` against the test Hub with a fresh cache (and a token it must never show)."""

    def run(
        *args: str, offline: bool = False, endpoint: str | None = None, timeout: int = 120
    ) -> Any:
        env = _hub_env(hub, hf_home, tmp_path / "logs", offline, endpoint)
        done = subprocess.run(
            [*EXE, *args], capture_output=True, text=True, env=env, timeout=timeout
        )
        assert SECRET not in done.stdout + done.stderr, "the token was printed"
        return done

    return run


def _cached_files(hf_home: Path) -> list[Path]:
    return (
        sorted(p for p in (hf_home / "hub").rglob("*") if p.is_file()) if hf_home.exists() else []
    )


def _numel(shape: list[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- search ----------------------------------------------------------------------------------------
def test_search_lists_matching_models_most_downloaded_first(
    cli: Callable[..., Any], models: dict[str, Path]
) -> None:
    from safetensors import safe_open

    with safe_open(models["base"] / "model.safetensors", "pt") as weights:
        parameters = sum(_numel(weights.get_slice(k).get_shape()) for k in weights.keys())  # noqa: SIM118
    found = cli("hub", "search", "tiny", "--limit", "3", "--json")
    assert found.returncode == 0, found.stderr
    hits = json.loads(found.stdout)
    assert [h["repo_id"] for h in hits] == ["acme/tiny-base", "acme/tiny-code", "acme/tiny-math"]
    assert hits[0]["downloads"] == 500 and hits[0]["pipeline_tag"] == "text-generation"
    assert hits[0]["parameters"] == parameters  # from the safetensors headers
    table = cli("hub", "search", "tiny-qwen")
    assert table.returncode == 0 and "acme/tiny-qwen" in table.stdout
    assert "no models match" in cli("hub", "search", "zzz-nothing").stdout


def test_search_offline_says_where_to_look_instead(cli: Callable[..., Any]) -> None:
    done = cli("hub", "search", "tiny", offline=True)
    assert done.returncode == 2
    assert "HF_HUB_OFFLINE" in done.stderr and "mergetui hub cached" in done.stderr


# -- info ------------------------------------------------------------------------------------------
def test_info_reports_commit_files_and_architecture_without_fetching_weights(
    cli: Callable[..., Any], hub: HubServer, hf_home: Path, models: dict[str, Path]
) -> None:
    done = cli("hub", "info", "acme/tiny-base", "--json")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    sha = subprocess.run(
        ["git", "rev-parse", "HEAD"],
        cwd=hub.mirrors / "models" / "acme" / "tiny-base",
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert info["commit"] == sha
    assert info["architectures"] == ["LlamaForCausalLM"] and info["model_type"] == "llama"
    assert info["weight_format"] == "safetensors"
    assert info["weight_bytes"] == (models["base"] / "model.safetensors").stat().st_size
    assert info["is_adapter"] is False and info["needs_custom_code"] is False
    sizes = {f["path"]: f["size"] for f in info["files"]}
    assert sizes["config.json"] == (models["base"] / "config.json").stat().st_size
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(info["needed_files"])
    assert not [p for p in _cached_files(hf_home) if p.suffix == ".safetensors"]
    table = cli("hub", "info", "acme/tiny-base")
    assert "LlamaForCausalLM" in table.stdout and "model.safetensors" in table.stdout


def test_info_on_bin_only_adapter_and_custom_code_repos(cli: Callable[..., Any]) -> None:
    binary = json.loads(cli("hub", "info", "acme/tiny-bin", "--json").stdout)
    assert binary["weight_format"] == "bin"
    assert "pytorch_model.bin" in binary["needed_files"]
    adapter = json.loads(cli("hub", "info", "acme/tiny-lora", "--json").stdout)
    assert adapter["is_adapter"] is True and adapter["adapter_base"] == "acme/tiny-base"
    custom = cli("hub", "info", "acme/tiny-custom")
    assert custom.returncode == 0
    assert "custom code" in custom.stdout and "never runs it" in custom.stdout


def test_info_resolves_revisions_and_names_what_is_missing(
    cli: Callable[..., Any], hub: HubServer
) -> None:
    tagged = json.loads(cli("hub", "info", "acme/tiny-code@v1", "--json").stdout)
    assert tagged["commit"] == hub.tag_commit  # type: ignore[attr-defined]
    latest = json.loads(cli("hub", "info", "acme/tiny-code", "--json").stdout)
    assert latest["commit"] != tagged["commit"]
    missing_revision = cli("hub", "info", "acme/tiny-code@v9")
    assert missing_revision.returncode == 2
    assert "revision 'v9' not found" in missing_revision.stderr
    missing_repo = cli("hub", "info", "acme/nothing-here")
    assert missing_repo.returncode == 2
    assert f"no such model at {hub.endpoint}" in missing_repo.stderr
    not_an_id = cli("hub", "info", "just-a-name")
    assert not_an_id.returncode == 2 and "org/name" in not_an_id.stderr


def test_gated_repo_says_how_to_log_in(cli: Callable[..., Any], hub: HubServer) -> None:
    done = subprocess.run(
        [*EXE, "hub", "info", "acme/tiny-gated"],
        capture_output=True,
        text=True,
        timeout=120,
        env={
            **{k: v for k, v in os.environ.items() if k != "HF_TOKEN"},
            "HF_ENDPOINT": hub.endpoint,
            "HF_HUB_OFFLINE": "0",
            "HF_HOME": "/nonexistent-mergetui-home",
        },
    )
    assert done.returncode == 2
    assert "gated or private; log in with `hf auth login` or set HF_TOKEN" in done.stderr
    assert "Traceback" not in done.stderr


def test_an_unreachable_endpoint_is_retried_then_named(cli: Callable[..., Any]) -> None:
    started = time.monotonic()
    done = cli("hub", "info", "acme/tiny-base", endpoint="http://127.0.0.1:9")
    assert done.returncode == 2
    assert "cannot reach the Hub at http://127.0.0.1:9 after 4 tries" in done.stderr
    assert time.monotonic() - started > 3  # backoff 0.5 + 1 + 2 s between the tries
    assert "Traceback" not in done.stderr


# -- download and cache ----------------------------------------------------------------------------
def test_download_fetches_only_what_a_merge_needs_into_the_standard_cache(
    cli: Callable[..., Any], hf_home: Path, hub: HubServer, models: dict[str, Path]
) -> None:
    done = cli("hub", "download", "acme/tiny-code", "--json")
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    progress = [e for e in events if e["event"] == "download"]
    assert progress and progress[-1]["bytes_done"] == progress[-1]["bytes_total"] > 0
    assert all(
        a["bytes_done"] <= b["bytes_done"] for a, b in zip(progress, progress[1:], strict=False)
    )
    assert events[0]["event"] == "start" and events[-1]["event"] == "downloaded"
    folder = Path(events[-1]["path"])
    repo = hf_home / "hub" / "models--acme--tiny-code"
    assert folder.parent == repo / "snapshots"
    assert (repo / "refs" / "main").read_text() == folder.name
    names = {p.name for p in folder.iterdir()}
    assert "NOTES.md" not in names  # not a file a merge needs
    assert {"config.json", "generation_config.json", "model.safetensors"} <= names
    assert _sha256(folder / "model.safetensors") == _sha256(models["ft_a"] / "model.safetensors")

    listed = json.loads(cli("hub", "cached", "--json").stdout)
    assert [m["repo_id"] for m in listed] == ["acme/tiny-code"]
    revision = listed[0]["revisions"][0]
    assert revision["commit"] == folder.name and revision["refs"] == ["main"]
    assert revision["usable_offline"] is True
    assert "usable" in cli("hub", "cached").stdout
    again = cli("hub", "download", "acme/tiny-code", offline=True)
    assert again.returncode == 0 and folder.name in again.stdout.replace("\n", "")


def test_download_of_a_bin_only_repo_takes_the_bin_weights(
    cli: Callable[..., Any], hf_home: Path
) -> None:
    done = cli("hub", "download", "acme/tiny-bin")
    assert done.returncode == 0, done.stderr
    snapshot = next((hf_home / "hub" / "models--acme--tiny-bin" / "snapshots").iterdir())
    assert (snapshot / "pytorch_model.bin").is_file()


def test_a_repo_without_config_is_refused_with_the_missing_file_named(
    cli: Callable[..., Any],
) -> None:
    done = cli("hub", "download", "acme/no-config")
    assert done.returncode == 2
    assert "no config.json in the repo" in done.stderr


def _big_shards(hub: HubServer) -> list[Path]:
    return sorted((hub.mirrors / "models" / "acme" / "big").glob("model-*.safetensors"))


def _complete_blob_sizes(blobs: Path) -> list[int]:
    """Sizes of the finished files in a cache's blob folder. huggingface_hub writes ``*.incomplete``
    and briefly creates ``tmp_*`` files to learn the umask; a file can vanish between the listing
    and its stat."""
    sizes = []
    for blob in blobs.glob("*") if blobs.exists() else []:
        if blob.name.endswith(".incomplete") or blob.name.startswith("tmp_"):
            continue
        try:
            sizes.append(blob.stat().st_size)
        except FileNotFoundError:
            continue
    return sorted(sizes)


def test_a_killed_download_keeps_finished_files_and_fetches_only_the_rest(
    cli: Callable[..., Any], hub: HubServer, hf_home: Path, tmp_path: Path
) -> None:
    """Files download in parallel: all but the stalled one finish, the process is killed, and the
    rerun fetches only the stalled file."""
    shards = _big_shards(hub)
    stalled = max(shards, key=lambda p: p.stat().st_size)
    finished = [p for p in shards if p != stalled]
    hub.stall_file, hub.stall_after = stalled.name, 1 << 20
    hub.release_stall.clear()
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.endpoint,
        "HF_HOME": str(hf_home),
        "HF_HUB_OFFLINE": "0",
        "MERGETUI_LOG_DIR": str(tmp_path / "logs"),
    }
    killed = subprocess.Popen(
        [*EXE, "hub", "download", "acme/big"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    blobs = hf_home / "hub" / "models--acme--big" / "blobs"
    wanted = sorted(p.stat().st_size for p in finished)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            sizes = _complete_blob_sizes(blobs)
            if all(size in sizes for size in wanted):
                break
            time.sleep(0.2)
        else:
            pytest.fail("the other shards never completed")
    finally:
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait()
        hub.stall_file = None
        hub.release_stall.set()
    hub.requests.clear()
    done = cli("hub", "download", "acme/big")
    assert done.returncode == 0, done.stderr
    fetched = [p for m, p, _ in hub.requests if m == "GET" and p.endswith(".safetensors")]
    assert [p for p in fetched if p.endswith(stalled.name)]
    assert not [p for p in fetched if any(p.endswith(f.name) for f in finished)], fetched
    snapshot = next((hf_home / "hub" / "models--acme--big" / "snapshots").iterdir())
    for shard in (*finished, stalled):
        assert _sha256(snapshot / shard.name) == _sha256(shard)


def test_a_dropped_connection_resumes_the_file_where_it_stopped(
    cli: Callable[..., Any], hub: HubServer, hf_home: Path
) -> None:
    shard = max(_big_shards(hub), key=lambda p: p.stat().st_size)
    hub.cut_file, hub.cut_after = shard.name, 11 << 20
    hub.requests.clear()
    done = cli("hub", "download", "acme/big")
    assert done.returncode == 0, done.stderr
    ranges = [r for m, p, r in hub.requests if m == "GET" and p.endswith(shard.name)]
    gets = [(p, r) for m, p, r in hub.requests if m == "GET"]
    # 10 MiB (one huggingface_hub chunk) were written before the cut
    assert ranges[:2] == [None, f"bytes={10 << 20}-"], (gets, done.stderr)
    snapshot = next((hf_home / "hub" / "models--acme--big" / "snapshots").iterdir())
    assert _sha256(snapshot / shard.name) == _sha256(shard)


# -- recipes with Hub ids ----------------------------------------------------------------------------
def _hub_recipe(tmp_path: Path, *models: str) -> Path:
    entries = "".join(f'[[models]]\nmodel = "{m}"\nweight = 0.5\ndensity = 0.5\n' for m in models)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        f'[merge]\nmethod = "ties"\nbase = "acme/tiny-base"\ndevice = "cpu"\n{entries}'
        f'[output]\npath = "{tmp_path / "merged"}"\n'
    )
    return recipe


def test_check_reads_hub_headers_not_weights(
    cli: Callable[..., Any], hub: HubServer, hf_home: Path, tmp_path: Path
) -> None:
    hub.requests.clear()
    ok = cli("check", str(_hub_recipe(tmp_path, "acme/tiny-code", "acme/tiny-math")))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "compatible" in ok.stdout
    assert not [p for p in _cached_files(hf_home) if p.suffix in (".safetensors", ".bin")]
    header_reads = [r for m, p, r in hub.requests if p.endswith(".safetensors") and m == "GET"]
    assert header_reads and all(r and r.startswith("bytes=0-") for r in header_reads)
    # the vocabulary is checked from the tokenizer files alone (small; fetched, weights not)
    assert "tokenizer = base" in ok.stdout and "same ids" in " ".join(ok.stdout.split())
    assert "tokenizer.json" in {p.name for p in _cached_files(hf_home)}

    mixed = cli("check", str(_hub_recipe(tmp_path, "acme/tiny-code", "acme/tiny-qwen")))
    assert mixed.returncode == 2
    assert "different architectures" in mixed.stdout + mixed.stderr
    dry = cli("run", "--dry-run", str(_hub_recipe(tmp_path, "acme/tiny-code", "acme/tiny-bin")))
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "shapes will be checked" in " ".join((dry.stdout + dry.stderr).split())
    assert not (tmp_path / "merged").exists()
    custom = cli("check", str(_hub_recipe(tmp_path, "acme/tiny-code", "acme/tiny-custom")))
    assert custom.returncode == 0
    assert "names custom code (auto_map); mergetui never runs it" in " ".join(custom.stdout.split())
    assert not [p for p in _cached_files(hf_home) if p.suffix in (".safetensors", ".bin")]


def test_run_downloads_with_progress_then_replays_offline_from_the_cache(
    cli: Callable[..., Any], hf_home: Path, tmp_path: Path
) -> None:
    recipe = _hub_recipe(tmp_path, "acme/tiny-code", "acme/tiny-math@main")
    done = cli("run", str(recipe), "--json")
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    downloaded = {e["repo_id"] for e in events if e["event"] == "download"}
    assert downloaded == {"acme/tiny-base", "acme/tiny-code", "acme/tiny-math"}
    assert events[-1]["event"] == "done"
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "acme/tiny-code" in card and SECRET not in card
    for path in (tmp_path / "merged").iterdir():
        assert SECRET.encode() not in path.read_bytes()
    log_text = "".join(p.read_text() for p in (tmp_path / "logs").glob("*"))
    assert SECRET not in log_text

    again = cli("run", str(recipe), "--force", offline=True)
    assert again.returncode == 0, again.stderr
    lonely = cli("run", str(_hub_recipe(tmp_path, "acme/tiny-qwen")), "--force", offline=True)
    assert lonely.returncode == 2
    assert "model acme/tiny-qwen is not in the cache" in lonely.stderr
    assert "mergetui hub download acme/tiny-qwen" in lonely.stderr


def test_a_lora_adapter_from_the_hub_is_folded_in(cli: Callable[..., Any], tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        '[merge]\nmethod = "passthrough"\ndevice = "cpu"\n'
        '[[models]]\nmodel = "acme/tiny-base"\nlora = "acme/tiny-lora"\n'
        f'[output]\npath = "{tmp_path / "merged"}"\n'
    )
    done = cli("run", str(recipe))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "merged" / "model.safetensors").is_file()


# -- the TUI's models step -------------------------------------------------------------------------
TUI_HUB_FLOW = """
import asyncio, sys
from pathlib import Path
from textual.widgets import Button, DataTable, Input, Static, TabbedContent
from mergetui.tui.app import create_app

async def wait(pilot, condition, what):
    for _ in range(600):
        if condition():
            return
        await pilot.pause(0.05)
    raise SystemExit(f"timed out waiting for {what}")

async def main():
    app = create_app(Path(sys.argv[1]))
    async with app.run_test(size=(110, 40)) as pilot:
        screen = app.screen
        screen.query_one("#sources", TabbedContent).active = "hub-tab"
        query = screen.query_one("#hub-query", Input)
        query.focus()
        query.value = "tiny"
        await pilot.press("enter")
        results = screen.query_one("#hub-results", DataTable)
        await wait(pilot, lambda: results.row_count > 0, "search results")
        print("HITS", screen.hits[:3])
        results.move_cursor(row=screen.hits.index("acme/tiny-code"))
        info = screen.query_one("#hub-info", Static)
        await wait(pilot, lambda: "LlamaForCausalLM" in str(info.render()), "the model's details")
        print("INFO", str(info.render()).replace("\\n", " | "))
        assert not screen.query_one("#hub-download", Button).disabled
        screen.query_one("#hub-download", Button).press()
        status = screen.query_one("#download-status", Static)
        await wait(pilot, lambda: "in the cache" in str(status.render()), "the download")
        cached = screen.query_one("#cached", DataTable)
        await wait(pilot, lambda: cached.row_count > 0, "the cache listing")
        print("CACHED", [str(cached.get_row_at(i)[0]) for i in range(cached.row_count)])
        screen.query_one("#hub-add", Button).press()
        await pilot.pause()
        print("DRAFT", [m.model for m in app.draft.models])

asyncio.run(main())
"""


def test_tui_searches_the_hub_shows_details_downloads_and_adds(
    hub: HubServer, hf_home: Path, tmp_path: Path
) -> None:
    env = _hub_env(hub, hf_home, tmp_path / "logs", offline=False, endpoint=None)
    done = subprocess.run(
        [sys.executable, "-c", TUI_HUB_FLOW, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert SECRET not in done.stdout + done.stderr
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
    assert lines["HITS"].startswith("['acme/tiny-base', 'acme/tiny-code'")
    assert "model_type llama" in lines["INFO"] and "config.json" in lines["INFO"]
    assert "acme/tiny-code" in lines["CACHED"]
    assert lines["DRAFT"] == "['acme/tiny-code']"
    snapshots = list((hf_home / "hub" / "models--acme--tiny-code" / "snapshots").iterdir())
    assert len(snapshots) == 1 and (snapshots[0] / "model.safetensors").is_file()
