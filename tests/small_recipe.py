"""The recipe tests' corpus: the `small` preset, or its `open` twin, at full architecture sizes, their
checkpoints replaced by local stand-ins (tests/pretrained.py), vocabularies reduced for 40 s of synthesised
music.

Made once per test run and preset (tests/conftest.py ``small_recipe``, ``open_recipe``) and read by
tests/test_recipe_small.py and test_recipe_open.py (tokenize, stats; the Ray group) and
tests/test_recipe_chain.py (train and generate; no Ray).
"""

from __future__ import annotations

from pathlib import Path

from tests.conftest import run_cli

RECIPE = """\
# the {preset} preset with its checkpoints replaced by local stand-ins, vocabularies reduced for {seconds} s of audio
base = "{preset}"

[tokenize]
shard_size = 2

[tokenize.clap]
model = "{clap}"
codebook_size = {clap_codes}

[tokenize.semantic]
model = "{semantic}"
codebook_size = 64

[tokenize.codec]
model = "{codec}"

[tokenize.fit]
min_points_per_code = 4
niter = 5

[train]
batch_size = 1
warmup_steps = 1
eval_every = 1
eval_batches = 1
save_every = 1
num_workers = 0
"""


STANDINS = {"small": {"semantic": "mert", "codec": "encodec"}, "open": {"semantic": "w2v-bert", "codec": "dac"}}
# files of 20 s, and CLAP codes they can feed at 4 points per code (11 fit windows of 10 s at a 1 s hop per file)
CORPUS = {"small": (2, 4), "open": (2, 4)}


def make_recipe(work: Path, standins, preset: str = "small") -> None:
    """Write the corpus and the ``preset`` recipe's config under ``work`` and tokenize it into ``work/data`` (a
    Ray run); the run's stderr is kept in ``work/tokenize.log``."""
    from musiclm.pipeline.synth_corpus import make_corpus

    files, clap_codes = CORPUS[preset]
    make_corpus(work / "music", files, seconds=(20.0, 20.0), seed=3)
    config = work / "recipe.toml"
    names = {"clap": "clap", **STANDINS[preset]}
    config.write_text(RECIPE.format(preset=preset, clap_codes=clap_codes, seconds=20 * files, **{role: standins[name].as_posix() for role, name in names.items()}))
    proc = run_cli("tokenize", work / "music", "--out", work / "data", "--config", config, timeout=900)
    assert proc.returncode == 0, proc.stderr
    (work / "tokenize.log").write_text(proc.stderr)


def recipe_paths(work: Path) -> dict:
    """{"config", "data", "work", "log"} of a made recipe folder."""
    return {"config": work / "recipe.toml", "data": work / "data", "work": work, "log": (work / "tokenize.log").read_text()}
