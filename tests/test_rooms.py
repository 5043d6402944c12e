"""The rooms depend one way: every import in jupyter_contain/ points down or sideways, never up.

    errors  <-  native  <-  runtime  <-  kernel  <-  server, cli

and inside the runtime: its base (``spec``, ``fsutil``, ``process``,
``userns``) <- ``images`` <- ``containers`` <- ``commit``, ``build`` (above
both halves). Every import counts: module level, inside functions (lazy
ones) and under ``TYPE_CHECKING``. The guest module runs inside containers,
where jupyter_contain is not installed: it imports none of it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "jupyter_contain"

#: room -> rooms it may import (its own included)
ALLOWED: dict[str, set[str]] = {
    "errors": {"errors"},
    "native": {"errors", "native"},
    "runtime.base": {"errors", "native", "runtime.base"},
    "runtime.images": {"errors", "native", "runtime.base", "runtime.images"},
    "runtime.containers": {"errors", "native", "runtime.base", "runtime.images", "runtime.containers"},
    "runtime.above": {"errors", "native", "runtime.base", "runtime.images", "runtime.containers",
                      "runtime.above"},
    # the runtime's public face names everything in it (lazily)
    "runtime": {"errors", "native", "runtime.base", "runtime.images", "runtime.containers", "runtime.above",
                "runtime"},
    "kernel": {"errors", "native", "runtime.base", "runtime.images", "runtime.containers", "runtime.above",
               "runtime", "kernel"},
    "guest": {"guest"},
    "server": {"errors", "native", "runtime.base", "runtime.images", "runtime.containers", "runtime.above",
               "runtime", "kernel", "server"},
    "cli": {"errors", "native", "runtime.base", "runtime.images", "runtime.containers", "runtime.above",
            "runtime", "kernel", "cli"},
    # the package itself: its version and the IPython extension hooks (the kernel room's magics)
    "top": {"kernel", "top"},
}


for _room, _allowed in ALLOWED.items():
    if _room != "guest":
        _allowed.add("version")   # ``from jupyter_contain import __version__``: a constant, no room


def room_of(module: str) -> str:
    parts = module.split(".")
    assert parts[0] == "jupyter_contain", module
    rest = parts[1:]
    if rest == ["__version__"]:
        return "version"
    if not rest:
        return "top"
    head = rest[0]
    if head == "runtime":
        if len(rest) == 1:
            return "runtime"
        sub = rest[1]
        if sub in ("images", "containers"):
            return f"runtime.{sub}"
        if sub in ("spec", "fsutil", "process", "userns"):
            return "runtime.base"
        return "runtime.above"   # commit, build: take containers, make images
    if head == "kernel" and len(rest) > 1 and rest[1] == "guest":
        return "guest"
    if head in ("errors", "native", "kernel", "server", "cli"):
        return head
    raise AssertionError(f"{module}: a module in no room (add it to a room in tests/test_rooms.py)")


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, module: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute module) of every jupyter_contain import in ``path``, wherever it stands.

    ``module``: the module's dotted name (default: from its place under jupyter_contain/).
    """
    module = module or _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "jupyter_contain"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "jupyter_contain":
                continue
            # ``from . import x`` and ``from .pkg import mod``: the names may be modules
            for a in node.names:
                candidate = f"{target}.{a.name}"
                as_module = PACKAGE.parent / Path(*candidate.split("."))
                if candidate == "jupyter_contain.__version__" or as_module.with_suffix(".py").is_file() \
                        or (as_module / "__init__.py").is_file():
                    out.append((node.lineno, candidate))
                else:
                    out.append((node.lineno, target))
    return out


def _sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_import_points_down_or_sideways():
    wrong = []
    for path in _sources():
        importer = _module_name(path)
        room = room_of(importer)
        for line, target in _imports(path):
            if room_of(target) not in ALLOWED[room]:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {room} imports {target} "
                             f"({room_of(target)})")
    assert not wrong, "imports against the rooms' direction:\n" + "\n".join(wrong)


def test_the_check_sees_lazy_relative_and_type_checking_imports(tmp_path):
    """The checker itself: an upward import hidden in a function, a relative one, one under
    TYPE_CHECKING are all found (a check that cannot fail is no check)."""
    images = PACKAGE / "runtime" / "images" / "rootless.py"
    names = {t for _, t in _imports(images)}
    assert "jupyter_contain.runtime.userns" in names and "jupyter_contain.errors" in names
    runtime_init = {t for _, t in _imports(PACKAGE / "runtime" / "__init__.py")}
    assert "jupyter_contain.runtime.containers.container" in runtime_init   # under TYPE_CHECKING
    assert room_of("jupyter_contain.runtime.containers.spawn") not in ALLOWED["runtime.images"]
    assert room_of("jupyter_contain.kernel.provisioner") not in ALLOWED["runtime.above"]
    assert room_of("jupyter_contain.runtime.commit") not in ALLOWED["runtime.containers"]
    probe = tmp_path / "probe.py"
    probe.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .store import Store\n"
                     "def f():\n    from ..containers import spawn\n    return spawn\n")
    found = _imports(probe, "jupyter_contain.runtime.images.probe")
    assert found == [(3, "jupyter_contain.runtime.images.store"), (5, "jupyter_contain.runtime.containers.spawn")]


@pytest.mark.parametrize("module", ["jupyter_contain.runtime.userns", "jupyter_contain.runtime.process"])
def test_the_runtime_base_imports_neither_half(module):
    path = PACKAGE / Path(*module.split(".")[1:]).with_suffix(".py")
    rooms = {room_of(t) for _, t in _imports(path)}
    assert rooms <= {"errors", "native", "runtime.base"}, rooms
