"""The package tree is the data flow: a package imports only packages below it (README, Architecture).

Every ``vq_tasks`` import is read from the source, including those inside functions (they run too);
imports under ``if TYPE_CHECKING:`` only name types and are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "vq_tasks"
# lowest first; packages on one line are beside each other and import neither the other. The
# first three lines are the ground floor: modules of vq_tasks/ itself, used by every package.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors",),
    ("logs", "manifest"),
    ("audit", "coordination"),
    ("streams",),
    ("crypto",),
    ("storage",),
    ("settings",),
    ("clients",),
    ("sources", "catalog"),
    ("retention",),
    ("backup", "verify"),
    ("monitoring",),
    ("restore",),
    ("worker",),
    ("cli",),
)
LEVEL = {name: level for level, names in enumerate(LAYERS) for name in names}
MAX_TOP_LEVEL_MODULES = 12


def room(module: str) -> str:
    """Return the package (or ground-floor module) that ``vq_tasks.a.b`` belongs to: ``a``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def runtime_imports(path: Path) -> list[tuple[int, str]]:
    """Return (line, module) of every vq_tasks import in ``path`` outside ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            typing_only |= {id(child) for stmt in node.body for child in ast.walk(stmt)}
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vq_tasks"):
            if node.module == "vq_tasks":
                found += [(node.lineno, f"vq_tasks.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("vq_tasks.")]
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def violations(paths: list[Path]) -> list[str]:
    """Return one line per import of a package that is not below the importing one."""
    found = []
    for path in paths:
        here = room(module_name(path))
        if here == "":  # vq_tasks/__init__.py: the Celery entry point (`celery -A vq_tasks`)
            continue
        for line, imported in runtime_imports(path):
            there = room(imported)
            if there != here and LEVEL.get(there, len(LAYERS)) >= LEVEL[here]:
                found.append(f"{path.relative_to(ROOT.parent)}:{line} ({here}) imports {imported} ({there})")
    return found


def test_every_room_is_placed_in_a_layer():
    rooms = {p.stem if p.is_file() else p.name for p in ROOT.iterdir() if p.name != "__init__.py"}
    rooms = {r for r in rooms if not r.startswith("__")}
    assert rooms == set(LEVEL)


def test_no_package_imports_one_above_it():
    assert violations(sorted(ROOT.rglob("*.py"))) == []


def test_restore_never_reaches_into_sources():
    paths = sorted((ROOT / "restore").rglob("*.py"))
    assert [m for p in paths for _, m in runtime_imports(p) if room(m) == "sources"] == []


def test_the_top_level_stays_small():
    modules = [p for p in ROOT.glob("*.py")]
    assert len(modules) <= MAX_TOP_LEVEL_MODULES, sorted(p.name for p in modules)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from vq_tasks.worker.app import app\n", ["imports vq_tasks.worker.app (worker)"]),
        (
            "def f():\n    from vq_tasks.cli.common import print_table\n",
            ["imports vq_tasks.cli.common (cli)"],
        ),
        ("from vq_tasks import catalog\n", ["imports vq_tasks.catalog (catalog)"]),
        ("import vq_tasks.monitoring.status\n", ["imports vq_tasks.monitoring.status (monitoring)"]),
        ("from vq_tasks import nowhere\n", ["imports vq_tasks.nowhere (nowhere)"]),
        (
            "from typing import TYPE_CHECKING\nif not TYPE_CHECKING:\n    from vq_tasks.cli import common\n",
            ["imports vq_tasks.cli (cli)"],
        ),
        (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from vq_tasks.worker.app import app\n",
            [],
        ),
        ("from vq_tasks.streams.stages import Writer\nfrom vq_tasks.errors import redact\n", []),
    ],
)
def test_the_check_catches_an_import_from_above(tmp_path, monkeypatch, source, expected):
    """A storage module that imports upwards is reported; one under TYPE_CHECKING or downwards is not."""
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path / "vq_tasks")
    path = tmp_path / "vq_tasks" / "storage" / "probe.py"
    path.parent.mkdir(parents=True)
    path.write_text(source)
    found = violations([path])
    assert [line.split(" ", 2)[2] for line in found] == expected
