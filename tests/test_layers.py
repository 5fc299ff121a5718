"""The package's layering, read from the source with ``ast``: imports point
down the layers (hw -> irq -> vring -> pci -> vcpu, devices -> testing/main), no
module uses another module's private (underscore) names: what a lower layer
offers is its public API (HACKING.md, "Layout"), and no modules import each
other, directly or round a longer circle."""
import ast
import importlib
from pathlib import Path

import pytest

import lguest_jit

PKG = Path(lguest_jit.__file__).parent
LAYERS = {"hw": 0, "irq": 1, "vring": 2, "pci": 3, "vcpu": 4, "devices": 4, "testing": 5, "main": 5, "snapshot": 5,
          "warm": 5, "machine": 5}


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
                    # `import lguest_jit.vring` binds `lguest_jit` (module_of follows the dots)
                    aliases[a.asname or "lguest_jit"] = a.name if a.asname else "lguest_jit"
                    out.append((a.name, None, node.lineno))
    out += private_uses(tree, aliases)
    return out


def _private(attr) -> bool:
    return isinstance(attr, str) and attr.startswith("_") and not attr.startswith("__")


def module_of(node, aliases: dict):
    """The package module an expression names (``vring``, ``lguest_jit.vring``,
    ``lguest_jit.hw.memory`` through any alias), or None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or node.id not in aliases:
        return None
    name = aliases[node.id]
    for part in reversed(parts):
        if not is_module(f"{name}.{part}"):
            return None
        name = f"{name}.{part}"
    return name


def private_uses(tree, aliases: dict) -> list:
    """(module, private name, line) for ``m._x``, ``a.b.m._x`` and
    ``getattr(m, "_x")`` (hasattr/setattr/delattr alike) on package modules."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            target, attr = module_of(node.value, aliases), node.attr
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "hasattr", "setattr", "delattr") and len(node.args) >= 2
              and isinstance(node.args[1], ast.Constant) and _private(node.args[1].value)):
            target, attr = module_of(node.args[0], aliases), node.args[1].value
        else:
            continue
        if target is not None:
            out.append((target, attr, node.lineno))
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
    ("lguest_jit.devices.fake", "import lguest_jit.vring\nlguest_jit.vring._pop(1)\n", "private"),
    ("lguest_jit.devices.fake", "import lguest_jit\nlguest_jit.hw.memory._map_image\n", "private"),
    ("lguest_jit.devices.fake", "from .. import vring\ngetattr(vring, '_pop')\n", "private"),
    ("lguest_jit.devices.fake", "import lguest_jit.vring\ngetattr(lguest_jit.vring, '_pop', None)\n", "private"),
    ("lguest_jit.devices.fake", "from ..hw import memory as m\nsetattr(m, '_libc', None)\n", "private"),
    ("lguest_jit.hw.fake", "from ..pci import BAR0_SIZE\n", "higher layer"),
    ("lguest_jit.hw.fake", "from ..devices import base\n", "higher layer"),
    ("lguest_jit.vring", "from .devices.base import Device\n", "higher layer"),
    ("lguest_jit.irq", "from .vring import Q_SIZE\n", "higher layer"),
    ("lguest_jit.pci.config", "from .transport import _get_le\n", "private"),
])
def test_the_checker_sees_each_kind_of_violation(name, source, what):
    found = violations(name, source)
    assert len(found) == 1 and what in found[0], found


def test_public_use_is_no_violation():
    assert violations("lguest_jit.devices.fake", "from .. import vring\nvring.next_chain\nvring.__name__\n"
                                                 "from ..vring import CHAIN_REQUEST\n") == []
    assert violations("lguest_jit.devices.fake", "import lguest_jit.vring\nlguest_jit.vring.next_chain\n"
                                                 "getattr(lguest_jit.vring, 'ERRORS')\ngetattr(self, '_x')\n"
                                                 "lguest_jit.vring.Thing._x\n") == []


def import_graph(sources) -> dict:
    """module -> the package modules it imports (any import, at any depth
    of the source: a function-local import is an edge too)."""
    graph = {}
    for path in sources:
        name = module_name(path)
        graph[name] = {target for target, _, _ in uses(name, path.read_text(), path.name == "__init__.py")
                       if target != name and target != "lguest_jit"}
    return graph


def circles(graph: dict) -> list:
    """Every import circle, each as the modules round it (depth-first)."""
    found, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return found


def test_no_import_circle():
    assert circles(import_graph(SOURCES)) == []


def test_the_circle_finder_sees_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert circles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_pci_package_reexports_every_public_name():
    """``from lguest_jit.pci import X`` works for every public name its
    modules define (the package was one module once)."""
    pci = importlib.import_module("lguest_jit.pci")
    missing = []
    for path in sorted((PKG / "pci").glob("*.py")):
        if path.name == "__init__.py":
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names = [node.name]
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
            else:
                continue
            missing += [f"{path.stem}.{n}" for n in names if not n.startswith("_") and not hasattr(pci, n)]
    assert missing == []
