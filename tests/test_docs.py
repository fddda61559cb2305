"""The README and docs/ say what runs: every fenced command is checked against the code it names.

Commands are the lines of fenced blocks tagged ``bash``/``sh``/``shell`` (every line) or ``console`` (the lines
after ``$ ``); blocks tagged otherwise (``text``, ``toml``, ``python``) hold no commands, and every fenced block
must carry a tag, so no command hides in an untagged one. Each command, split at pipes, is checked by what it
starts with:

- ``musiclm SUB ...`` (and ``torchrun ... -m musiclm SUB ...``): parsed by the real CLI's click command, built
  from typer, so an unknown subcommand, a renamed option or a bad value fails;
- ``python benchmarks/X.py ...``: the script exists and its own argparse parser accepts the arguments (run in
  one subprocess, stopped right after ``parse_args``: nothing is measured);
- ``make X``: X is a target of the Makefile;
- ``pip install ...``: the extras named exist in pyproject.toml;
- ``python -m pytest ... tests/X.py -k WORD``: the test file exists and WORD names one of its tests;
- anything else must be listed in :data:`UNCHECKED` with the reason.

Fast: no training, no Ray, no backbone.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from musiclm.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND_LANGS = {"bash", "sh", "shell", "console"}
TABLE_WIDTH = 120
README_LINES = 250

# first words of commands that cannot be checked here, with the reason
UNCHECKED = {
    "aplay": "ALSA's player reading the WAV stream on a pipe; not part of this project",
}

FENCE = re.compile(r"^(\s*)(```+)(\S*)\s*$")


def fenced_blocks(markdown: str) -> list[tuple[int, str, list[str]]]:
    """Each fenced block of Markdown text: (line number of its fence, tag, lines dedented by the fence's indent)."""
    blocks, lines = [], markdown.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, ticks, tag = m.groups()
        body, j = [], i + 1
        while j < len(lines) and lines[j].strip() != ticks:
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        blocks.append((i + 1, tag, body))
        i = j + 1
    return blocks


def doc_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) of every command in the fenced blocks of README.md and docs/*.md, split at pipes."""
    found = []
    for path in DOCS:
        for line_no, tag, body in fenced_blocks(path.read_text(encoding="utf-8")):
            if tag not in COMMAND_LANGS:
                continue
            for k, line in enumerate(body):
                if tag == "console":
                    if not line.startswith("$ "):
                        continue
                    line = line[2:]
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                lexer = shlex.shlex(line, posix=True, punctuation_chars="|;&")
                lexer.whitespace_split = True
                segment: list[str] = []
                where = f"{path.relative_to(ROOT)}:{line_no + 1 + k}"
                for token in [*lexer, "|"]:
                    if token in {"|", "||", "&&", ";", "&"}:
                        if segment:
                            found.append((where, segment))
                        segment = []
                    else:
                        segment.append(token)
    return found


def without_env(argv: list[str]) -> list[str]:
    """The command without leading VAR=value assignments."""
    i = 0
    while i < len(argv) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", argv[i]):
        i += 1
    return argv[i:]


COMMANDS = [(where, without_env(argv)) for where, argv in doc_commands()]


def kind(argv: list[str]) -> str:
    """Which checker a command goes to."""
    program = Path(argv[0]).name
    if program == "musiclm":
        return "musiclm"
    if program == "torchrun":
        return "torchrun"
    if program == "make":
        return "make"
    if program == "pip":
        return "pip"
    if program.startswith("python"):
        if argv[1:3] == ["-m", "pytest"]:
            return "pytest"
        if len(argv) > 1 and argv[1].startswith("benchmarks/"):
            return "benchmark"
    if program in UNCHECKED:
        return "unchecked"
    return "unknown"


def of_kind(name: str) -> list[tuple[str, list[str]]]:
    return [(where, argv) for where, argv in COMMANDS if kind(argv) == name]


def ids(commands) -> list[str]:
    return [f"{where} {' '.join(argv)[:60]}" for where, argv in commands]


def parse_musiclm(args: list[str]) -> None:
    """Parse ``musiclm ARGS`` with the real CLI's options (types and ranges included); raise on a bad one."""
    group = typer.main.get_command(app)
    assert args, "musiclm with no subcommand"
    name, *rest = args
    command = group.commands.get(name)
    assert command is not None, f"no subcommand {name!r} (there are: {', '.join(sorted(group.commands))})"
    command.make_context(f"musiclm {name}", rest)


def test_the_docs_hold_commands_of_every_kind():
    kinds = {kind(argv) for _, argv in COMMANDS}
    assert {"musiclm", "benchmark", "make"} <= kinds, kinds


def test_every_command_has_a_checker_or_a_reason():
    unknown = [f"{where}: {' '.join(argv)}" for where, argv in COMMANDS if kind(argv) == "unknown"]
    assert not unknown, "commands that nothing checks (add a checker, or a reason to UNCHECKED):\n" + "\n".join(unknown)


def test_every_fenced_block_says_what_it_holds():
    untagged = [f"{path.relative_to(ROOT)}:{n}" for path in DOCS for n, tag, _ in fenced_blocks(path.read_text(encoding="utf-8")) if not tag]
    assert not untagged, f"fenced blocks without a language tag (bash, console, text, toml, python): {untagged}"


@pytest.mark.parametrize("where, argv", of_kind("musiclm"), ids=ids(of_kind("musiclm")))
def test_musiclm_commands_parse(where, argv):
    parse_musiclm(argv[1:])


@pytest.mark.parametrize("where, argv", of_kind("torchrun"), ids=ids(of_kind("torchrun")))
def test_torchrun_commands_run_the_cli(where, argv):
    assert "-m" in argv and argv[argv.index("-m") + 1] == "musiclm", f"{where}: torchrun of something else"
    parse_musiclm(argv[argv.index("-m") + 2 :])


def test_a_bad_musiclm_command_fails_the_check():
    try:  # typer >= 0.29 vendors its own click
        from typer._click import exceptions as click_exceptions
    except ImportError:  # older typer uses the click package
        from click import exceptions as click_exceptions

    with pytest.raises(click_exceptions.UsageError):
        parse_musiclm(["train", "semantic", "--data", "d", "--out", "r", "--no-such-option"])
    with pytest.raises(click_exceptions.BadParameter):
        parse_musiclm(["tokenize", "music", "--out", "d", "--workers", "0"])
    with pytest.raises(AssertionError):
        parse_musiclm(["trian", "semantic"])


def makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = re.finditer(r"^([A-Za-z0-9_-][A-Za-z0-9_.-]*)\s*:(?!=)", text, re.MULTILINE)  # not .PHONY
    return {m.group(1) for m in targets}


@pytest.mark.parametrize("where, argv", of_kind("make"), ids=ids(of_kind("make")))
def test_make_targets_exist(where, argv):
    targets = [a for a in argv[1:] if not a.startswith("-") and "=" not in a]
    assert targets and set(targets) <= makefile_targets(), f"{where}: {targets} not in {sorted(makefile_targets())}"


@pytest.mark.parametrize("where, argv", of_kind("pip"), ids=ids(of_kind("pip")))
def test_pip_extras_exist(where, argv):
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    for arg in argv[2:]:
        if m := re.fullmatch(r"(?:musiclm|\.)\[([^\]]+)\]", arg):
            missing = set(m.group(1).split(",")) - set(extras)
            assert not missing, f"{where}: no extra {missing} in pyproject.toml"


@pytest.mark.parametrize("where, argv", of_kind("pytest"), ids=ids(of_kind("pytest")))
def test_pytest_commands_select_tests(where, argv):
    files = [a for a in argv if a.startswith("tests/")]
    assert files, f"{where}: no test file named"
    for name in files:
        assert (ROOT / name).is_file(), f"{where}: {name} does not exist"
    if "-k" in argv:
        word = argv[argv.index("-k") + 1]
        names = re.findall(r"^def (test_\w+)", "".join((ROOT / f).read_text() for f in files), re.MULTILINE)
        assert any(word in n for n in names), f"{where}: -k {word} selects no test in {files}"


# Runs each benchmark as __main__ with argparse's parse_args replaced by: parse for real (exit 2 and a message
# on a bad argument), then stop. The module-level code and main() up to parse_args run (imports, constants).
PARSE_ONLY = r"""
import argparse, json, runpy, sys
from pathlib import Path

class Parsed(BaseException):
    pass

real_parse = argparse.ArgumentParser.parse_args

def parse_then_stop(self, args=None, namespace=None):
    real_parse(self, args, namespace)
    raise Parsed

argparse.ArgumentParser.parse_args = parse_then_stop
results = []
for script, args in json.loads(sys.argv[1]):
    sys.argv = [script, *args]
    sys.path.insert(0, str(Path(script).parent))
    try:
        runpy.run_path(script, run_name="__main__")
        results.append("the script ended without parsing its arguments")
    except Parsed:
        results.append("ok")
    except SystemExit as e:
        results.append(f"argparse refused the arguments (exit {e.code})")
    except BaseException as e:
        results.append(f"failed before parsing: {type(e).__name__}: {e}")
    finally:
        sys.path.pop(0)
print(json.dumps(results))
"""


def test_benchmark_commands_name_scripts_whose_parsers_accept_them():
    commands = of_kind("benchmark")
    assert commands
    for where, argv in commands:
        assert (ROOT / argv[1]).is_file(), f"{where}: {argv[1]} does not exist"
    jobs = [(str(ROOT / argv[1]), argv[2:]) for _, argv in commands]
    run = subprocess.run(
        [sys.executable, "-c", PARSE_ONLY, json.dumps(jobs)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    bad = [f"{where}: {' '.join(argv)}: {r}" for (where, argv), r in zip(commands, results) if r != "ok"]
    assert not bad, "\n".join(bad) + "\n" + run.stderr[-3000:]


def test_readme_is_a_front_door():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_LINES
    for doc in sorted((ROOT / "docs").glob("*.md")):
        assert f"docs/{doc.name}" in text, f"README does not link docs/{doc.name}"
    group = typer.main.get_command(app)
    for name in group.commands:
        assert f"**`musiclm {name} " in text, f"README has no paragraph for musiclm {name}"
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings[:3] == ["## Set up", "## Quick start", "## Commands"], headings
    assert headings[-2:] == ["## Layout", "## Licences and the `open` recipe"], headings
    setup = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    block = next(body for _, tag, body in fenced_blocks(setup) if tag == "bash")
    assert [line.split("#")[0].strip() for line in block] == ["make demo", "make test"]


@pytest.mark.parametrize("path", DOCS, ids=[p.name for p in DOCS])
def test_tables_fit_120_characters(path):
    wide = [
        f"{path.name}:{n}: {len(line)}"
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if line.startswith("|") and len(line) > TABLE_WIDTH
    ]
    assert not wide, wide


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("path", DOCS, ids=[p.name for p in DOCS])
def test_local_links_and_anchors_exist(path):
    text = path.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # a web address
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        assert linked.exists(), f"{path.name}: link to {target}: no such file"
        if anchor and linked.suffix == ".md":
            anchors = {slug(h) for h in re.findall(r"^#+ (.+)$", linked.read_text(encoding="utf-8"), re.MULTILINE)}
            assert anchor in anchors, f"{path.name}: link to {target}: no such heading"


DOTTED = re.compile(r"(?<![.\w])musiclm(?:\.\w+)+")


def dotted_names(text: str) -> set[str]:
    """The ``musiclm.x.y`` names a text mentions (not ``.musiclm.lock`` or ``args.musiclm``)."""
    return {m.group(0) for m in DOTTED.finditer(text)}


def resolves(name: str) -> bool:
    """Whether ``name`` is a module of the package, or an attribute reached from the longest module prefix."""
    import importlib

    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_every_dotted_musiclm_name_in_the_docs_and_docstrings_exists():
    """A doc or docstring that names ``musiclm.training.trainer.load_stage`` after it moved is caught here."""
    texts = [*DOCS, *sorted((ROOT / "musiclm").rglob("*.py")), *sorted((ROOT / "benchmarks").glob("*.py"))]
    missing = sorted(
        f"{path.relative_to(ROOT)}: {name}" for path in texts for name in dotted_names(path.read_text(encoding="utf-8")) if not resolves(name)
    )
    assert not missing, "\n".join(missing)


def test_the_name_check_finds_a_moved_name():
    assert dotted_names("see :func:`~musiclm.hub.resolve_model` and .musiclm.lock") == {"musiclm.hub.resolve_model"}
    assert not resolves("musiclm.hub.resolve_model") and resolves("musiclm.hub.pull.resolve_model")
