"""The `small` recipe test's corpus: the small preset at full architecture sizes, its checkpoints replaced by
local stand-ins (tests/pretrained.py), vocabularies reduced for 80 s of synthesised music.

Made once per test run (tests/conftest.py ``small_recipe``) and read by tests/test_recipe_small.py (tokenize,
stats; the Ray group) and tests/test_recipe_small_chain.py (train and generate; no Ray).
"""

from __future__ import annotations

from pathlib import Path

from tests.conftest import run_cli

RECIPE = """\
# the small preset with its checkpoints replaced by local stand-ins, vocabularies reduced for 80 s of audio
base = "small"

[tokenize]
shard_size = 2

[tokenize.clap]
model = "{clap}"
codebook_size = 8

[tokenize.mert]
model = "{mert}"
codebook_size = 64

[tokenize.encodec]
model = "{encodec}"

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


def make_recipe(work: Path, standins) -> None:
    """Write the corpus and its config under ``work`` and tokenize it into ``work/data`` (a Ray run); the run's
    stderr is kept in ``work/tokenize.log``."""
    from musiclm.pipeline.synth_corpus import make_corpus

    make_corpus(work / "music", 4, seconds=(20.0, 20.0), seed=3)
    config = work / "recipe.toml"
    config.write_text(RECIPE.format(**{name: standins[name].as_posix() for name in ("clap", "mert", "encodec")}))
    proc = run_cli("tokenize", work / "music", "--out", work / "data", "--config", config, timeout=900)
    assert proc.returncode == 0, proc.stderr
    (work / "tokenize.log").write_text(proc.stderr)


def recipe_paths(work: Path) -> dict:
    """{"config", "data", "work", "log"} of a made recipe folder."""
    return {"config": work / "recipe.toml", "data": work / "data", "work": work, "log": (work / "tokenize.log").read_text()}
