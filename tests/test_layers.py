"""The layers of engine/ and cli/ are kept by a tool (issue 18 item 6).

``.ci/layers`` runs import-linter's contracts (``[tool.importlinter]`` in
pyproject.toml) on a plain install of a tree. It must pass on this one and
fail on a copy where a module imports upward or closes a cycle.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAYERS = REPO / ".ci" / "layers"

pytestmark = pytest.mark.slow


def _check(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(LAYERS), str(tree)], capture_output=True, text=True,
                          timeout=120)


def _copy(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("pyproject.toml", "README.md", "sample-config.toml"):
        shutil.copy(REPO / name, tree / name)
    for name in ("engine", "cli"):
        shutil.copytree(REPO / name, tree / name, ignore=shutil.ignore_patterns("__pycache__"))
    return tree


def _add_import(module: Path, line: str) -> None:
    text = module.read_text()
    anchor = "from __future__ import annotations\n"
    assert anchor in text, module
    module.write_text(text.replace(anchor, f"{anchor}\n{line}\n", 1))


def test_this_tree_keeps_its_layers() -> None:
    checked = _check(REPO)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "3 kept, 0 broken" in checked.stdout, checked.stdout


def test_an_engine_module_that_imports_the_cli_breaks_the_layers(tmp_path: Path) -> None:
    tree = _copy(tmp_path)
    _add_import(tree / "engine" / "names.py", "from pibackup_async.cli import render")
    checked = _check(tree)
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert ("pibackup_async.engine is not allowed to import pibackup_async.cli"
            in " ".join(checked.stdout.split())), checked.stdout


def test_an_adapter_that_names_the_pipeline_breaks_the_layers(tmp_path: Path) -> None:
    # A type is a dependency too: an import for annotations only counts.
    tree = _copy(tmp_path)
    _add_import(tree / "engine" / "processes.py",
                "from typing import TYPE_CHECKING\n\n"
                "if TYPE_CHECKING:\n    from .pipeline import run_backup")
    checked = _check(tree)
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert ("pibackup_async.engine.processes is not allowed to import "
            "pibackup_async.engine.pipeline" in " ".join(checked.stdout.split())), checked.stdout


def test_an_import_cycle_breaks_the_contracts(tmp_path: Path) -> None:
    # Within one layer the order is free, but never both ways.
    tree = _copy(tmp_path)
    _add_import(tree / "engine" / "lookup.py", "from .pruning import prune_backups")
    checked = _check(tree)
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert "No cycles are allowed in pibackup_async.engine." in checked.stdout, checked.stdout


def test_a_module_outside_every_layer_breaks_the_layers(tmp_path: Path) -> None:
    tree = _copy(tmp_path)
    (tree / "engine" / "stray.py").write_text('"""A module no layer names."""\n')
    checked = _check(tree)
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert "- pibackup_async.engine.stray" in checked.stdout, checked.stdout
