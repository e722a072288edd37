"""The distribution installs every package folder under the names `meg.*`."""

from __future__ import annotations

import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _declared() -> tuple[dict[str, str], list[str]]:
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return setup["package-dir"], setup["packages"]


def test_every_package_folder_is_declared() -> None:
    package_dir, packages = _declared()
    found = set()
    for name, folder in package_dir.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            dotted = ".".join((name, *rel.parts)) if rel.parts else name
            # a folder mapped to its own name is found under that name, not twice
            if not any(dotted.startswith(f"{other}.") and (ROOT / package_dir[other]) == init.parent
                       for other in package_dir if other != name):
                found.add(dotted)
    assert found <= set(packages), f"package folders missing from pyproject packages: {sorted(found - set(packages))}"


def test_packages_import_under_meg() -> None:
    _, packages = _declared()
    for name in packages:
        importlib.import_module(name)


def test_stdlib_codecs_is_not_shadowed() -> None:
    # From the repository root, where a folder named `codecs` sits on the path.
    code = "import meg.codecs, codecs; assert codecs.encode('x', 'rot13') == 'k'; print(meg.codecs.__name__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "meg.codecs"
