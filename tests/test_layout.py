"""The package's layering: each room imports only the rooms below it, so there is no import cycle."""
from __future__ import annotations

import ast
from pathlib import Path

import prefopt

ROOT = Path(prefopt.__file__).parent

# Lowest first. A room may import its own modules and any room on a lower line.
LAYERS = [
    {"errors"},
    {"yaml_safe", "atomic"},
    {"losses", "analysis"},
    {"plugins"},
    {"config"},
    {"data"},
    {"engine"},
    {"testing"},
    {"training"},
    {"cli"},
]
RANK = {room: rank for rank, rooms in enumerate(LAYERS) for room in rooms}
FACADES = {"__init__", "__main__"}  # the public API and the entry point sit above everything


def room_of(module: str) -> str:
    """``prefopt.engine.modeling`` -> ``engine``; ``prefopt.config`` -> ``config``."""
    return module.split(".")[1]


def imports(path: Path) -> set[str]:
    """Every prefopt module ``path`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "prefopt":
                found |= {f"prefopt.{alias.name}" for alias in node.names}
            elif node.module.startswith("prefopt."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("prefopt.")}
    return found


def edges(root: Path = ROOT) -> dict[str, set[str]]:
    """Room -> the other rooms its modules import."""
    graph: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        room = rel.parts[0].removesuffix(".py")
        if room in FACADES:
            continue
        targets = {room_of(m) for m in imports(path)} - {room}
        graph.setdefault(room, set()).update(t for t in targets if t not in {"__version__", "hookimpl"})
    return graph


def test_every_module_belongs_to_a_declared_room():
    rooms = {p.relative_to(ROOT).parts[0].removesuffix(".py") for p in ROOT.rglob("*.py")} - FACADES
    assert rooms <= set(RANK), f"add {sorted(rooms - set(RANK))} to LAYERS"


def test_rooms_import_only_rooms_below_them():
    upward = sorted(
        f"{room} imports {target}" for room, targets in edges().items() for target in targets
        if RANK[target] >= RANK[room]
    )
    assert upward == [], "imports that point up or sideways (a cycle in the making): " + "; ".join(upward)


def test_there_is_no_import_cycle_between_rooms():
    graph = edges()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join(path + [node, nxt])
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])


def test_the_top_level_keeps_at_most_six_modules():
    modules = {p.stem for p in ROOT.glob("*.py")} - FACADES
    assert len(modules) <= 6, sorted(modules)
    assert len([p for p in ROOT.iterdir() if (p / "__init__.py").exists()]) >= 5


def test_the_checker_sees_a_lazy_upward_import(tmp_path):
    """The checks above can fail: an import inside a function, from a higher room, is an edge."""
    (tmp_path / "losses").mkdir()
    (tmp_path / "losses" / "dpo.py").write_text("def f():\n    from prefopt.training import trainer\n")
    (tmp_path / "config.py").write_text("from prefopt import errors\n")
    assert edges(tmp_path) == {"losses": {"training"}, "config": {"errors"}}
