"""The house rules, enforced: layers import only downwards, and the engine never imports Textual."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mergetui"

#: Each layer and the layers it may import. ``methods.registry`` is declarative data (no torch) that
#: drives validation, help and forms, so every layer may read it. ``sweep`` drives the engine and
#: the evaluation (it sits above both) for the CLI and the TUI.
LAYERS = ["recipe", "sources", "methods", "engine", "evaluate", "sweep", "cli", "tui"]
SHARED = {
    "mergetui",
    "mergetui.errors",
    "mergetui.events",
    "mergetui.pauses",
    "mergetui.units",
    "mergetui.logs",
    "mergetui.gpus",
    "mergetui.openmp",
    "mergetui.methods.registry",
}
ALLOWED_EXTRA = {"cli": {"demo", "jobs"}, "tui": {"demo", "jobs"}}
#: ``mergetui`` with no command opens the TUI: the CLI's entry point launches it (cli and tui are
#: both top layers; the TUI never imports the CLI).
ALLOWED_UPWARD = {("cli", "tui")}


def _layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return {name for name in found if name.startswith("mergetui")}


def test_layers_import_only_downwards() -> None:
    violations = []
    for path in PACKAGE.rglob("*.py"):
        module = "mergetui." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        layer = _layer_of(module)
        if layer is None:
            continue
        rank = LAYERS.index(layer)
        for imported in _imports(path):
            if imported in SHARED:
                continue
            target = _layer_of(imported)
            if target is None:
                if imported.split(".")[1] not in ALLOWED_EXTRA.get(layer, set()):
                    violations.append(f"{module} imports {imported}")
            elif LAYERS.index(target) > rank and (layer, target) not in ALLOWED_UPWARD:
                violations.append(f"{module} imports {imported} (a layer above)")
    assert not violations, "\n".join(violations)


def test_engine_and_lower_layers_never_import_textual() -> None:
    code = (
        "import importlib, pkgutil, sys\n"
        "import mergetui\n"
        "for info in pkgutil.walk_packages(mergetui.__path__, 'mergetui.'):\n"
        "    if info.name.startswith(('mergetui.tui', 'mergetui.cli', 'mergetui.__main__')):\n"
        "        continue\n"
        "    importlib.import_module(info.name)\n"
        "print('textual' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_importing_recipe_and_registry_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import mergetui.recipe, mergetui.methods, mergetui.engine.plan, mergetui.engine.executor, mergetui.jobs\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False False"
