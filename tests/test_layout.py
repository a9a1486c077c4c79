"""The layout of DESIGN.md section 2: imports point down only."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _top(name: str) -> str:
    return name.split(".")[0]


def _files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_core_never_imports_flower_or_the_flower_layer() -> None:
    offenders = []
    for path in _files("abd_fl"):
        if path.name == "cli.py" and path.parent.name == "abd_fl":
            continue
        bad = {m for m in _imported_modules(path) if _top(m) in {"flwr", "strategies", "clients"}}
        if bad:
            offenders.append((str(path.relative_to(ROOT)), sorted(bad)))
    assert offenders == []


def test_distill_never_imports_the_defense() -> None:
    offenders = [
        str(p.relative_to(ROOT))
        for p in _files("abd_fl/distill")
        if any(m.startswith("abd_fl.defense") for m in _imported_modules(p))
    ]
    assert offenders == []


def test_algorithm_floors_point_down() -> None:
    """data/models import no higher floor; attacks no distill/defense; distill no defense.

    attacks sits above data and models (DESIGN section 2), so it may import them: the CL
    trigger trains a surrogate classifier built by ``abd_fl.models.build_model``.
    """
    higher = {
        "abd_fl/data": ("abd_fl.attacks", "abd_fl.distill", "abd_fl.defense", "abd_fl.models"),
        "abd_fl/models": ("abd_fl.attacks", "abd_fl.distill", "abd_fl.defense", "abd_fl.data"),
        "abd_fl/attacks": ("abd_fl.distill", "abd_fl.defense"),
    }
    offenders = []
    for package, forbidden in higher.items():
        for path in _files(package):
            bad = [m for m in _imported_modules(path) if m.startswith(forbidden)]
            if bad:
                offenders.append((str(path.relative_to(ROOT)), bad))
    assert offenders == []


def test_flower_adapters_do_not_import_each_other() -> None:
    offenders = []
    for package, other in (("strategies", "clients"), ("clients", "strategies")):
        for path in _files(package):
            if any(_top(m) == other for m in _imported_modules(path)):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
