"""The package's structure holds: its import-linter contracts are kept, and no private name crosses a module boundary."""

import ast
import re
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


def stated_layer(path: Path) -> str | None:
    """The room a module's docstring names on its `Layer: ...` line."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    for line in doc.splitlines():
        if line.startswith("Layer: "):
            return line.removeprefix("Layer: ").split()[0].strip(".,;")
    return None


BASE = {"atomic", "digest", "errors", "version", "integrity", "config", "device"}


def room_of(path: Path) -> str:
    """The room .importlinter puts a module in: its subpackage, `base` for the bottom two layers, `top` for the rest."""
    parts = path.relative_to(ROOT / "musiclm").with_suffix("").parts
    if len(parts) > 1:
        return parts[0]
    return "base" if parts[0] in BASE else ("metrics" if parts[0] == "metrics" else "top")


def test_every_module_states_the_layer_it_lives_in():
    """Each module's docstring says its layer (STYLE: one idea per module, with its layer stated), and says it truly."""
    wrong = []
    for path in sorted((ROOT / "musiclm").rglob("*.py")):
        stated, room = stated_layer(path), room_of(path)
        if stated != room:
            wrong.append(f"{path.relative_to(ROOT)}: states {stated!r}, lives in {room!r}")
    assert not wrong, "\n".join(wrong)


def test_the_layer_check_catches_a_wrong_statement(tmp_path):
    pkg = tmp_path / "musiclm" / "shards"
    pkg.mkdir(parents=True)
    (pkg / "x.py").write_text('"""A module.\n\nLayer: pipeline.\n"""\n')
    assert stated_layer(pkg / "x.py") == "pipeline"
    assert room_of(ROOT / "musiclm" / "shards" / "x.py") == "shards" != stated_layer(pkg / "x.py")


def test_docs_architecture_lists_every_module_once():
    """docs/architecture.md's module lists (`- \\`room/module.py\\`: ...`) name every module of the package, and only those."""
    listed = re.findall(r"^- `([\w/]+\.py)`", (ROOT / "docs" / "architecture.md").read_text(), re.MULTILINE)
    modules = sorted(str(p.relative_to(ROOT / "musiclm")) for p in (ROOT / "musiclm").rglob("*.py"))
    assert sorted(listed) == modules
