"""The package's structure holds: its import-linter contracts are kept, and no private name crosses a module boundary."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_import_linter_contracts_are_kept():
    """.importlinter's layers, the forbidden imports and the acyclic siblings (the same check `make test` prints)."""
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "0 broken" in done.stdout


def private_imports(root: Path) -> list[str]:
    """`from musiclm.x import _name` lines under root: a private name imported from another module."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("musiclm"):
                names = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                if names:
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.module} {names}")
    return found


def test_no_private_name_crosses_a_module_boundary():
    assert private_imports(ROOT / "musiclm") == []


def test_the_private_name_check_finds_one(tmp_path):
    pkg = tmp_path / "musiclm"
    pkg.mkdir()
    (pkg / "a.py").write_text("from musiclm.b import _hidden, shown\n")
    assert private_imports(pkg) == ["musiclm/a.py:1 musiclm.b ['_hidden']"]
