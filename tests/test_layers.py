"""The package's layering, read from the source with ``ast``: imports point
down the layers (hw -> vring -> pci -> devices -> testing/main), and no
module uses another module's private (underscore) names: what a lower layer
offers is its public API (HACKING.md, "Layout")."""
import ast
from pathlib import Path

import pytest

import lguest_jit

PKG = Path(lguest_jit.__file__).parent
LAYERS = {"hw": 0, "vring": 1, "pci": 2, "devices": 3, "testing": 4, "main": 4, "snapshot": 4, "warm": 4, "machine": 4}


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (PKG.parent / rel).with_suffix(".py").exists() or (PKG.parent / rel / "__init__.py").exists()


def layer(name: str):
    parts = name.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def uses(name: str, source: str, is_package: bool = False):
    """(target module, private name or None, line) for each import of a
    package module in ``source`` (module ``name``) and each private name it
    takes from one, by ``from m import _x`` or ``m._x``."""
    tree = ast.parse(source)
    package = name if is_package else name.rpartition(".")[0]
    aliases = {}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("lguest_jit"):
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                if is_module(sub):
                    aliases[a.asname or a.name] = sub
                    out.append((sub, None, node.lineno))
                else:
                    out.append((target, a.name if a.name.startswith("_") else None, node.lineno))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("lguest_jit"):
                    aliases[a.asname or a.name] = a.name
                    out.append((a.name, None, node.lineno))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            out.append((aliases[node.value.id], node.attr, node.lineno))
    return out


def violations(name: str, source: str, is_package: bool = False) -> list:
    found = []
    for target, private, line in uses(name, source, is_package):
        if target == name or target == "lguest_jit":
            continue
        if private is not None:
            found.append(f"{name}:{line} uses {target}.{private}, a private name")
        lo, hi = layer(target), layer(name)
        if lo is not None and hi is not None and lo > hi:
            found.append(f"{name}:{line} imports {target}, a higher layer")
    return found


SOURCES = sorted(PKG.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PKG)))
def test_imports_point_down_and_stay_public(path):
    assert violations(module_name(path), path.read_text(), path.name == "__init__.py") == []


@pytest.mark.parametrize("name, source, what", [
    ("lguest_jit.devices.fake", "from ..vring import _pop\n", "private"),
    ("lguest_jit.devices.fake", "from .. import vring\nvring._push(1, 2, 3, 4)\n", "private"),
    ("lguest_jit.devices.fake", "import lguest_jit.vring as v\nv._fail(0, 1)\n", "private"),
    ("lguest_jit.hw.fake", "from ..pci import BAR0_SIZE\n", "higher layer"),
    ("lguest_jit.hw.fake", "from ..devices import base\n", "higher layer"),
    ("lguest_jit.vring", "from .devices.base import Device\n", "higher layer"),
])
def test_the_checker_sees_each_kind_of_violation(name, source, what):
    found = violations(name, source)
    assert len(found) == 1 and what in found[0], found


def test_public_use_is_no_violation():
    assert violations("lguest_jit.devices.fake", "from .. import vring\nvring.next_chain\nvring.__name__\n"
                                                 "from ..vring import CHAIN_REQUEST\n") == []
