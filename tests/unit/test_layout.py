"""The layout's import rules (README "Layout"; the docstrings of core/, cni/, ipamd/):

- core imports neither cni nor ipamd (it is shared by the plugins, the daemon and the agent);
- ipamd never imports cni;
- the node agent imports only the core: neither cni nor ipamd (and no one imports the agent);
- cni never imports ipamd at all: whatever the plugins share with the daemon (the IPAM spec, the
  client and its wire contract, netns sockets, frames) lives in core, so in particular cni never
  reaches ipamd's server side (allocator, stores, server, service).

Checked statically over every module, including imports inside functions and under
TYPE_CHECKING, so a lazy import cannot slip through. The checker itself is tested on a planted
violation, so this test cannot pass by finding nothing.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# package -> top-level packages it must never import
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "core": ("cni", "ipamd", "agent"),
    "ipamd": ("cni", "agent"),
    "cni": ("ipamd", "agent"),
    "agent": ("cni", "ipamd"),
}


def imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import statement in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            yield node.lineno, "." * node.level + (node.module or "")  # relative: stays in the package


def violations(root: Path) -> list[str]:
    out = []
    for pkg, banned in FORBIDDEN.items():
        for path in sorted((root / pkg).rglob("*.py")):
            if "_proto" in path.parts:
                continue  # generated
            for line, mod in imports(path):
                top = mod.split(".")[0]
                if top in banned:
                    out.append(f"{path.relative_to(root)}:{line}: {pkg} imports {mod}")
    return out


def test_the_packages_keep_their_import_rules() -> None:
    assert violations(ROOT) == []


def test_every_package_states_its_rule() -> None:
    for pkg in FORBIDDEN:
        doc = ast.get_docstring(ast.parse((ROOT / pkg / "__init__.py").read_text())) or ""
        assert "Import rules" in doc, f"{pkg}/__init__.py must state the import rules"


@pytest.mark.parametrize(("pkg", "line"), [
    ("core", "from cni.errors import CniError"),
    ("core", "def f():\n    import ipamd.allocator\n"),
    ("ipamd", "from cni import skel"),
    ("cni", "from ipamd.allocator import Allocator"),
    ("agent", "from cni.errors import CniError"),
    ("core", "from agent import plan"),
    ("cni", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ipamd.store import Store\n"),
])
def test_the_checker_catches_a_planted_violation(tmp_path: Path, pkg: str, line: str) -> None:
    for p in FORBIDDEN:
        (tmp_path / p).mkdir()
        (tmp_path / p / "__init__.py").write_text('"""Import rules: see tests."""\n')
    (tmp_path / pkg / "bad.py").write_text(line + "\n")
    found = violations(tmp_path)
    assert len(found) == 1 and found[0].startswith(f"{pkg}/bad.py:")
