"""A command's start-up imports only what it uses (issue 21): the nightly mirror must copy
one new backup within 1.1x of a hand ``rsync --link-dest`` (SPEC §10), and every module
loaded from a cold page cache costs it. Each check runs in a fresh interpreter, so what
this suite already imported does not hide what a command loads."""

from __future__ import annotations

import subprocess
import sys
from typing import TYPE_CHECKING

import pytest
from conftest import needs_rsync
from mirrorkit import Bench

if TYPE_CHECKING:
    from pathlib import Path

    from conftest import Workspace

ENGINE = "pibackup_async.engine"


def loaded_by(code: str, into: Path, env: dict[str, str] | None = None) -> set[str]:
    """The modules loaded once ``code`` ran in a fresh interpreter (listed in ``into``)."""
    wrapper = (f"{code}\nimport sys\n"
               f"open({str(into)!r}, 'w').write('\\n'.join(sorted(sys.modules)))\n")
    done = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True,
                          timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    return set(into.read_text().split())


def engine_modules(modules: set[str]) -> set[str]:
    return {m.removeprefix(ENGINE + ".") for m in modules if m.startswith(ENGINE + ".")}


def test_importing_the_manifest_module_loads_only_what_it_uses(tmp_path: Path) -> None:
    modules = loaded_by("import pibackup_async.engine.manifest", tmp_path / "modules")

    assert engine_modules(modules) == {"manifest", "allocated", "checksums"}
    assert not {"anyio", "structlog", "msgspec", "asyncio"} & modules


def test_the_engine_package_still_offers_its_public_names() -> None:
    import pibackup_async.engine as engine
    from pibackup_async.engine.pipeline import run_backup

    assert engine.run_backup is run_backup
    assert set(engine.__all__) <= set(dir(engine))
    for name in engine.__all__:
        assert getattr(engine, name) is not None
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = engine.no_such_name  # type: ignore[attr-defined]


def test_preflight_is_the_function_even_once_its_module_is_loaded(tmp_path: Path) -> None:
    # Importing a submodule binds it on the package, under the name of the function
    # ``preflight`` it holds: `check` would get the module.
    loaded_by("import pibackup_async.engine.preflight\n"
              "from pibackup_async.engine import preflight\n"
              "from pibackup_async.engine.preflight import preflight as function\n"
              "assert preflight is function, preflight", tmp_path / "modules")


# What the mirror command has no use for: the run's plan (and the mail module only the
# plan loads), the listing, the other commands' CLI modules; and rich off a terminal
# (cli/main.py's _structlog_without_rich).
NOT_FOR_MIRROR = {f"{ENGINE}.plan", f"{ENGINE}.listing", f"{ENGINE}.mail",
                  "pibackup_async.cli.check", "pibackup_async.cli.restore",
                  "pibackup_async.cli.verify", "pibackup_async.cli.inspect", "smtplib", "rich"}


@needs_rsync
@pytest.mark.parametrize("args", [["--dry-run"], []], ids=["dry-run", "real"])
def test_the_mirror_command_loads_none_of_the_other_commands_modules(
        ws: Workspace, args: list[str]) -> None:
    bench = Bench(ws)
    bench.backup()
    config = bench.write_mirror_config()
    argv = ["-c", str(config), "mirror", *args]

    modules = loaded_by("from pibackup_async.cli.main import main\n"
                        f"code = main({argv!r})\nassert code == 0, code",
                        ws.root / "modules", ws.env())

    assert f"{ENGINE}.mirror" in modules
    assert NOT_FOR_MIRROR & modules == set()
    if not args:
        assert bench.mirror_backups() == bench.origin_backups()
