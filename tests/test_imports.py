"""The import plan: no module of ds_bilevel imports one above it in the layer order that
docs/design.md states ("Layout"), so there is no circle either. Reads the source with ast (no
import), so it takes well under a second.

Counted: every ``import`` and ``from ... import`` of a ds_bilevel module, at the top or inside a
function (a lazy import is still an arrow). Not counted: imports under ``if TYPE_CHECKING:``
(annotations only; never run).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "ds_bilevel"


def layer_order() -> dict[str, tuple[int, int]]:
    """module (dotted, without ``ds_bilevel.``) -> (layer, place in its layer), from the lines
    ``layer N  name: module module ...`` of docs/design.md."""
    order = {}
    for line in (REPO / "docs" / "design.md").read_text().splitlines():
        match = re.match(r"layer (\d+) +[^:]+: (.+)$", line.strip())
        if match:
            for place, module in enumerate(match.group(2).split()):
                order[module] = (int(match.group(1)), place)
    return order


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The ds_bilevel modules ``path`` imports (names relative to the package)."""
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from ds_bilevel.adapters import base`` names a module; ``... import AdapterLayer`` only
            # its package.
            submodules = [f"{node.module}.{alias.name}" for alias in node.names]
            names = [n for n in submodules if n.removeprefix("ds_bilevel.") in known] or [node.module]
        else:
            continue
        if not _type_checking_only(node, parents):
            found.update(name.removeprefix("ds_bilevel.") for name in names
                         if name.startswith("ds_bilevel.") and name.removeprefix("ds_bilevel.") in known)
    return found


def test_every_module_imports_only_modules_below_it():
    order = layer_order()
    assert order, "docs/design.md has lost its layer lines ('layer N  name: modules')"
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    paths.pop("", None)  # ds_bilevel/__init__.py
    unplaced = sorted(set(paths) - set(order))
    assert not unplaced, f"modules missing from docs/design.md's layer lines: {unplaced}"
    stale = sorted(set(order) - set(paths))
    assert not stale, f"docs/design.md's layer lines name modules that do not exist: {stale}"
    upward = [f"{module} (layer {order[module][0]}) imports {target} (layer {order[target][0]})"
              for module, path in sorted(paths.items()) for target in sorted(imported_modules(path, set(paths)))
              if target != module and order[target] >= order[module]]
    assert not upward, "imports of a module above (docs/design.md, Layout):\n" + "\n".join(upward)


def test_levels_import_nothing_from_the_package():
    """The vocabulary is the ground floor: levels.py imports no ds_bilevel module at all."""
    paths = {module_name(path) for path in PACKAGE.rglob("*.py")}
    assert imported_modules(PACKAGE / "levels.py", paths) == set()
