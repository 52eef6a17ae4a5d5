"""The settings as their source declares them, read without importing it (--help must answer
without torch): each field's type, default, docstring and the values its validate() allows.
ds_bilevel/config.py builds the command line and docs/usage.md's table from them.
"""

from __future__ import annotations

import ast
import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path

# The nested sections of RunConfig: field name -> (module, dataclass). The modules import torch, so
# the command line's help is read from their source (``settings``) and the classes are imported on
# first use (``section_class``).
SECTIONS = {"adapter": ("ds_bilevel.adapters.config", "AdapterConfig"),
            "data": ("ds_bilevel.data", "DataConfig"),
            "bilevel": ("ds_bilevel.bilevel_config", "BilevelConfig")}


@dataclass(frozen=True)
class Setting:
    """One leaf setting as the source declares it: what --help and docs/usage.md's table show."""

    key: str  # "adapter.rank"
    type: str  # the annotation as written: "int", "float", "str", "bool", "list[str]"
    default: object
    doc: str  # the docstring under the field, whitespace collapsed
    choices: tuple[str, ...] = ()  # the values its validate() accepts, where it checks membership
    rule: str = ""  # what its validate() requires otherwise ("an integer >= 1"), from the error it raises


def _module_source(module: str) -> ast.Module:
    """The parsed source of a ds_bilevel module (a package: its __init__.py), without importing it."""
    path = Path(__file__).resolve().parent.parent.joinpath(*module.split("."))
    return ast.parse((path / "__init__.py" if path.is_dir() else path.with_suffix(".py")).read_text())


def _constants(tree: ast.Module) -> dict[str, object]:
    """Module-level NAME = <literal>; a mapping (a dict, or one wrapped in a call such as
    MappingProxyType): its keys. LR_SCHEDULERS, METHODS."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target = node.target
        else:
            continue
        value = node.value
        if isinstance(value, ast.Call) and len(value.args) == 1 and isinstance(value.args[0], ast.Dict):
            value = value.args[0]
        if not isinstance(target, ast.Name):
            continue
        with contextlib.suppress(ValueError, TypeError, SyntaxError):
            out[target.id] = (tuple(ast.literal_eval(k) for k in value.keys if k is not None)
                              if isinstance(value, ast.Dict) else ast.literal_eval(value))
    return out


def _resolve(name: str, tree: ast.Module, depth: int = 3) -> object:
    """The literal value of ``name`` in a module: its own constant, or one it imports from another
    ds_bilevel module (at module level or inside a function). None where it is not a literal."""
    constants = _constants(tree)
    if name in constants or depth == 0:
        return constants.get(name)
    for node in ast.walk(tree):
        if (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ds_bilevel")
                and any(alias.name == name for alias in node.names)):
            return _resolve(name, _module_source(node.module), depth - 1)
    return None


def _default(node: ast.expr | None, constants: dict[str, object]) -> object:
    """A field's default from its source: a literal, or ``field(default_factory=list | lambda: [...])``."""
    if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "field":
        factory = next(k.value for k in node.keywords if k.arg == "default_factory")
        if isinstance(factory, ast.Lambda):
            return eval(compile(ast.Expression(factory.body), "<default>", "eval"), {"__builtins__": {}}, constants)
        return {"list": [], "dict": {}}[factory.id]
    return ast.literal_eval(node)


# Settings whose allowed values their validate() does not check by membership: (module, constant).
CHOICES_FROM = {"adapter.method": (("ds_bilevel.adapters.registry", "ds_bilevel.adapters"), "METHODS")}


def _choices_from(key: str) -> tuple[str, ...]:
    modules, name = CHOICES_FROM[key]
    for module in modules:
        with contextlib.suppress(FileNotFoundError):
            values = _resolve(name, _module_source(module))
            if values:
                return tuple(values)
    return ()


def _choices(cls_node: ast.ClassDef, tree: ast.Module) -> dict[str, tuple[str, ...]]:
    """{field: allowed values} from the class's validate(): ``if self.<field> not in NAME``, NAME a
    constant of the module or imported from another ds_bilevel module."""
    out = {}
    for function in (n for n in cls_node.body if isinstance(n, ast.FunctionDef) and n.name == "validate"):
        for node in ast.walk(function):
            if (isinstance(node, ast.Compare) and isinstance(node.ops[0], (ast.In, ast.NotIn))
                    and isinstance(node.left, ast.Attribute) and getattr(node.left.value, "id", "") == "self"
                    and isinstance(node.comparators[0], ast.Name)):
                values = _resolve(node.comparators[0].id, tree)
                if values:
                    out[node.left.attr] = tuple(values)
    return out


def _rules(cls_node: ast.ClassDef) -> dict[str, str]:
    """{field: "an integer >= 1"} from the class's validate(): the text after "must be" of each
    ``raise ValueError(f"<field>: {value!r} must be ...")``, the field named in the message or by the
    ``for name in (...)`` loop around it."""
    out: dict[str, str] = {}

    def visit(node: ast.AST, loop_names: tuple[str, ...]) -> None:
        if isinstance(node, ast.For) and isinstance(node.iter, ast.Tuple):
            with contextlib.suppress(ValueError):
                loop_names = tuple(ast.literal_eval(node.iter))
        exc = node.exc if isinstance(node, ast.Raise) else None
        if (isinstance(exc, ast.Call) and getattr(exc.func, "id", "") == "ValueError" and exc.args
                and isinstance(exc.args[0], ast.JoinedStr)):
            text = "".join(p.value if isinstance(p, ast.Constant) else "\0" for p in exc.args[0].values)
            head, must, rule = text.partition(" must ")
            head = head.split(":")[0]
            if must and "\0" not in rule:
                for name in loop_names if "\0" in head else (head.rsplit(".", 1)[-1],):
                    out.setdefault(name, rule.removeprefix("be "))
        for child in ast.iter_child_nodes(node):
            visit(child, loop_names)

    for function in (n for n in cls_node.body if isinstance(n, ast.FunctionDef) and n.name == "validate"):
        visit(function, ())
    return out


def _class_settings(module: str, cls: str, prefix: str, tree: ast.Module | None = None) -> list[Setting]:
    tree = tree or _module_source(module)
    constants = _constants(tree)
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    choices, rules = _choices(node, tree), _rules(node)
    out = []
    for item, after in zip(node.body, [*node.body[1:], None], strict=True):
        if not isinstance(item, ast.AnnAssign) or not isinstance(item.target, ast.Name):
            continue
        name, annotation = item.target.id, ast.unparse(item.annotation)
        if annotation.startswith(("typing.ClassVar", "ClassVar")):
            continue
        if name in SECTIONS:
            out += _class_settings(*SECTIONS[name], prefix=f"{prefix}{name}.")
            continue
        doc = after.value.value if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) else ""
        key = prefix + name
        out.append(Setting(key, annotation, _default(item.value, constants), " ".join(doc.split()),
                           _choices_from(key) if key in CHOICES_FROM else choices.get(name, ()), rules.get(name, "")))
    return out


@functools.lru_cache(maxsize=1)
def settings() -> tuple[Setting, ...]:
    """Every leaf setting, in RunConfig's order then each section's, read from the source files
    (tests/test_config.py checks them against the imported dataclasses)."""
    return tuple(_class_settings("ds_bilevel.config", "RunConfig", ""))
