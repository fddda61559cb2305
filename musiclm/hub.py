"""Share trained models through the Hugging Face Hub: push the three stages, pull them back by repo id, and
the model card that says what they are, what they learnt from and under which licences.

A pushed model is one commit of a model repo::

    README.md                                   the model card (:func:`model_card`)
    tokenizer/...                               the tokenizer folder the stages were trained with
    STAGE/run.json                              STAGE: semantic, coarse, fine (fine may be missing)
    STAGE/metrics.jsonl                         the training and held-out losses, as logged
    STAGE/manifest.json                         the corpus manifest summary, when the run carries one
    STAGE/checkpoints/latest                    names the one checkpoint below
    STAGE/checkpoints/step-N/model.safetensors  the weights only: no optimizer, scheduler or RNG state
    STAGE/checkpoints/step-N/records.json       the weights' bytes and sha256 (musiclm.integrity)

so that a pulled snapshot is a model folder :meth:`MusicLM.from_pretrained` reads like a local one
(:func:`stage_source` finds a stage's weights without ``state.pt``) and ``musiclm verify`` checks.
A push refuses damaged weights or a damaged tokenizer (every file hashed against its record).

Pulling goes through ``huggingface_hub.snapshot_download``: the cache (``HF_HUB_CACHE`` / ``HF_HOME``),
offline mode (``HF_HUB_OFFLINE=1``), tokens and endpoints are the library's own. ``revision`` (a branch,
tag or commit sha) pins what is pulled. A pulled tokenizer whose config has ``trust_remote_code`` (MERT-v1)
would run code from the hub when it loads; that needs ``trust_remote_code=True`` (``--trust-remote-code``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from musiclm.config import STAGES
from musiclm.errors import UserError

README = "README.md"
TOKENIZER = "tokenizer"
RUN_FILES = ("run.json", "metrics.jsonl", "manifest.json")  # copied from each run folder when present
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
MUSICLM_LICENCE = "Apache-2.0"


# ---- pull --------------------------------------------------------------------------------------------------------------


def is_repo_id(name: str) -> bool:
    """``owner/name`` as the hub spells repo ids (a bare name is taken for a local folder)."""
    return bool(REPO_ID.match(name)) and ".." not in name


def resolve_model(name_or_path: str | Path, revision: str | None = None, trust_remote_code: bool = False) -> Path:
    """The model folder of ``name_or_path``: a local folder as it is, else the hub repo ``owner/name``
    downloaded (or found in the cache) at ``revision`` (None: main). Errors are one-line UserErrors.

    A folder pulled from the hub whose tokenizer would run remote code is refused unless ``trust_remote_code``.
    """
    local = Path(name_or_path)
    if local.exists():
        if not local.is_dir():
            raise UserError(f"model folder {local} is a file: give the folder that holds semantic/, coarse/ and fine/")
        if revision is not None:
            raise UserError(f"--revision pins a hub model, but {local} is a local folder: drop --revision")
        return local
    name = str(name_or_path)
    if not is_repo_id(name):
        raise UserError(f"model folder {name} does not exist (and it is not a hub id of the form owner/name)")
    folder = Path(_download(name, revision))
    check_remote_code(folder, name, trust_remote_code)
    return folder


def _download(repo_id: str, revision: str | None) -> str:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f" at revision {revision}" if revision else ""
    try:
        return snapshot_download(repo_id, revision=revision)
    except RevisionNotFoundError:
        raise UserError(f"the hub model {repo_id} has no revision {revision}: give a branch, tag or commit sha it has") from None
    except GatedRepoError:
        raise UserError(f"the hub model {repo_id} is gated: accept its conditions on the hub, then log in (hf auth login) or set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise UserError(f"no model {repo_id} on the hub, or it is private: check the id, and log in (hf auth login) or set HF_TOKEN") from None
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"
        raise UserError(
            f"{repo_id}{at} is neither a local folder nor in the Hugging Face cache ({constants.HF_HUB_CACHE}), and {why}: "
            "pull it once with network access, or give a local folder"
        ) from None
    except (HfHubHTTPError, OSError) as e:  # IncompleteSnapshotError is an OSError too
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot pull {repo_id}{at} from the hub: {first}") from None


def _remote_code_settings(config: Any, where: str = "tokenize") -> list[str]:
    """Dotted names of every ``trust_remote_code = true`` in a tokenizer config."""
    found = []
    if isinstance(config, dict):
        for k, v in config.items():
            if k == "trust_remote_code" and v is True:
                found.append(f"{where}.{k}")
            else:
                found += _remote_code_settings(v, f"{where}.{k}")
    return found


def check_remote_code(folder: Path, name: str, trust_remote_code: bool) -> None:
    """Refuse a pulled model whose tokenizer (``tokenizer/`` or a stage's copy) would load remote code, unless trusted."""
    if trust_remote_code:
        return
    for record_path in [folder / TOKENIZER / "tokenizer.json", *(folder / s / TOKENIZER / "tokenizer.json" for s in STAGES)]:
        if not record_path.is_file():
            continue
        try:
            config = json.loads(record_path.read_text()).get("config", {})
        except ValueError:
            continue  # not ours to judge: Tokenizer.load says what is wrong with it
        settings = _remote_code_settings(config)
        if settings:
            section = settings[0].rsplit(".", 1)[0]
            model = _get(config, section.split(".")[1:] + ["model"])
            raise UserError(
                f"{name}'s tokenizer would run code from the hub ({settings[0]} = true, for {model}): "
                "pass --trust-remote-code (trust_remote_code=True) if you trust that code"
            )


def _get(d: Any, keys: list[str]) -> Any:
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return d


def stage_source(run: str | Path) -> Path:
    """What :func:`~musiclm.training.trainer.load_stage` should read for the stage folder ``run``: the folder
    itself when it has a complete checkpoint (a training run), else the checkpoint its ``checkpoints/latest``
    names when that holds the weights (a pushed or pulled model, which has no ``state.pt``)."""
    from musiclm.training.checkpoint import CHECKPOINTS, LATEST, WEIGHTS, list_checkpoints

    run = Path(run)
    if (run / WEIGHTS).is_file() or list_checkpoints(run):
        return run
    pointer = run / CHECKPOINTS / LATEST
    if pointer.is_file():
        target = run / CHECKPOINTS / pointer.read_text().strip()
        if (target / WEIGHTS).is_file():
            return target
    return run


# ---- push --------------------------------------------------------------------------------------------------------------


@dataclass
class StageRun:
    """One stage folder of a model folder, as pushed."""

    name: str
    run: Path
    step: int
    weights: Path  # .../checkpoints/step-N/model.safetensors
    record: dict[str, Any]  # run.json


def _stage_runs(runs: Path) -> dict[str, StageRun]:
    """The stages of the model folder ``runs`` (semantic and coarse required), each with its newest weights."""
    from musiclm.training.checkpoint import WEIGHTS, latest_checkpoint

    if not runs.is_dir():
        raise UserError(f"model folder {runs} does not exist: it should hold the semantic/, coarse/ and fine/ run folders")
    found: dict[str, StageRun] = {}
    for name in STAGES:
        run = runs / name
        if not run.exists():
            if name != "fine":
                raise UserError(f"no {name} stage: {runs} has no {name}/ run folder")
            continue
        ckpt = latest_checkpoint(run) or stage_source(run)  # a training run, else a pushed (weights-only) stage
        if ckpt == run:
            raise UserError(f"{run} holds no checkpoint: train it with musiclm train {name}")
        if not (ckpt / WEIGHTS).is_file():  # a LoRA run's checkpoints hold its adapter, which needs its base run
            raise UserError(f"{ckpt} holds no full weights ({WEIGHTS}; a LoRA adapter run?): merge it into a full run first, then push that")
        try:
            record = json.loads((run / "run.json").read_text())
        except (OSError, ValueError):
            raise UserError(f"{run} is not a musiclm run folder (no readable run.json)") from None
        if record.get("stage") != name:
            raise UserError(f"{run} is a {record.get('stage')} stage, found as the {name} stage")
        found[name] = StageRun(name, run, int(ckpt.name.split("-", 1)[1]), ckpt / WEIGHTS, record)
    fingerprints = {s.record.get("fingerprint") for s in found.values()}
    if len(fingerprints) > 1:
        raise UserError(f"the stages of {runs} were trained on tokens of different tokenizers: train all three on one tokenized corpus")
    return found


def _tokenizer_dir(runs: Path, stages: dict[str, StageRun]) -> Path:
    """``runs/tokenizer``, else a stage's own copy; checked to be the stages' tokenizer, with its quantizers."""
    from musiclm.shards.tokenizer_folder import read_record

    fingerprint = next(iter(stages.values())).record.get("fingerprint")
    for folder in [runs / TOKENIZER, *(s.run / TOKENIZER for s in stages.values())]:
        if not (folder / "tokenizer.json").is_file():
            continue
        record = read_record(folder)
        if record["fingerprint"] != fingerprint:
            continue
        missing = [f for f in record["quantizers"] if not (folder / f).is_file()]
        if missing:
            raise UserError(f"the tokenizer {folder} lacks {', '.join(missing)}: copy the tokenized corpus's DIR/tokenizer folder there")
        return folder
    raise UserError(f"cannot find the tokenizer (fingerprint {fingerprint}) of {runs}: put the corpus's DIR/tokenizer folder at {runs / TOKENIZER}")


def _weights_record(s: StageRun) -> bytes:
    """The record file of a pushed checkpoint: its weight file's record (from the run's record file, whose
    sha256 the weights were just checked against; hashed now for a checkpoint written before record files)."""
    import tempfile

    from musiclm.integrity import FileRecord, read_records, write_records
    from musiclm.training.checkpoint import RECORDS, WEIGHTS, require_sound

    require_sound(s.weights.parent, s.record, advice="restore it from a copy (or musiclm train --resume the run past it), then push again")
    try:
        record = read_records(s.weights.parent / RECORDS)[WEIGHTS]
    except FileNotFoundError:
        record = FileRecord.of(s.weights)
    with tempfile.TemporaryDirectory() as tmp:
        write_records(Path(tmp) / RECORDS, {WEIGHTS: record})
        return (Path(tmp) / RECORDS).read_bytes()


def push_operations(runs: str | Path, repo_id: str | None = None) -> list:
    """The ``CommitOperationAdd`` list of a push (see the module docstring): what :func:`push` commits."""
    from huggingface_hub import CommitOperationAdd

    from musiclm.shards.tokenizer_folder import check_folder
    from musiclm.training.checkpoint import CHECKPOINTS, LATEST, RECORDS, WEIGHTS

    runs = Path(runs)
    stages = _stage_runs(runs)
    tokenizer = _tokenizer_dir(runs, stages)
    check_folder(tokenizer, full=True)
    ops = [CommitOperationAdd(README, model_card(runs, repo_id=repo_id).encode("utf-8"))]
    for path in sorted(p for p in tokenizer.rglob("*") if p.is_file()):
        rel = path.relative_to(tokenizer)
        if any(part.startswith(".") for part in rel.parts):  # temporaries of an interrupted write
            continue
        ops.append(CommitOperationAdd(f"{TOKENIZER}/{rel.as_posix()}", str(path)))
    for s in stages.values():
        for name in RUN_FILES:
            if (s.run / name).is_file():
                ops.append(CommitOperationAdd(f"{s.name}/{name}", str(s.run / name)))
        ckpt = s.weights.parent.name
        ops.append(CommitOperationAdd(f"{s.name}/{CHECKPOINTS}/{LATEST}", (ckpt + "\n").encode()))
        ops.append(CommitOperationAdd(f"{s.name}/{CHECKPOINTS}/{ckpt}/{WEIGHTS}", str(s.weights)))
        ops.append(CommitOperationAdd(f"{s.name}/{CHECKPOINTS}/{ckpt}/{RECORDS}", _weights_record(s)))
    return ops


def push(
    runs: str | Path,
    repo_id: str,
    *,
    revision: str | None = None,
    token: str | None = None,
    private: bool = False,
    endpoint: str | None = None,
) -> str:
    """Upload the model folder ``runs`` (semantic/, coarse/, fine/ run folders, optionally tokenizer/) to the
    hub repo ``repo_id`` as one commit: each stage's newest weights (no optimizer state), run.json, metrics
    and corpus manifest, the tokenizer folder, and a model card. Files of an earlier push that this one no
    longer has (an older step's weights) are deleted in the same commit; other files of the repo are kept.

    ``revision``: the branch to commit to (created from main when new; None: main). ``token``, ``endpoint``:
    as huggingface_hub takes them (None: the logged-in token, HF_ENDPOINT). ``private``: for a new repo.
    Returns the commit sha, which ``--revision`` pins on pull.
    """
    from huggingface_hub import CommitOperationDelete, HfApi
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError

    if not is_repo_id(repo_id):
        raise UserError(f"'{repo_id}' is not a hub repo id: use owner/name")
    ops = push_operations(runs, repo_id=repo_id)
    weights = [op.path_in_repo.split("/") for op in ops if op.path_in_repo.split("/")[0] in STAGES and op.path_in_repo.endswith("/model.safetensors")]
    steps = ", ".join(f"{parts[0]} step {int(parts[2].split('-')[1])}" for parts in weights)
    ours = {README, TOKENIZER, *STAGES}
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision not in (None, "main"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        try:
            existing = api.list_repo_files(repo_id, revision=revision)
        except (RevisionNotFoundError, EntryNotFoundError, RepositoryNotFoundError):
            existing = []  # a new repo: nothing committed yet
        new = {op.path_in_repo for op in ops}
        stale = [CommitOperationDelete(p) for p in existing if p.split("/")[0] in ours and p not in new]
        info = api.create_commit(
            repo_id,
            operations=[*ops, *stale],
            commit_message=f"musiclm {_version()}: {steps}",
            revision=revision,
        )
    except OfflineModeIsEnabled:
        raise UserError("HF_HUB_OFFLINE is set: unset it to push to the hub") from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            raise UserError(f"not allowed to push to {repo_id}: log in (hf auth login), set HF_TOKEN or pass --token with write access") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"pushing to {repo_id} failed: {first}") from None
    return info.oid


def _version() -> str:
    from musiclm.version import __version__

    return __version__


# ---- model card --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Licence:
    """A backbone's licence as its authors state it; ``spdx`` None where it could not be verified."""

    spdx: str | None
    non_commercial: bool | None  # None: not known
    source: str  # where it is stated
    note: str = ""


# Looked up in the authors' model cards and repositories; a backbone missing here is "not verified".
BACKBONE_LICENCES: dict[str, Licence] = {
    "laion/larger_clap_music": Licence("apache-2.0", False, "https://huggingface.co/laion/larger_clap_music"),
    "m-a-p/MERT-v0": Licence("cc-by-nc-4.0", True, "https://huggingface.co/m-a-p/MERT-v0"),
    "m-a-p/MERT-v0-public": Licence(
        "cc-by-nc-4.0", True, "https://huggingface.co/m-a-p/MERT-v0-public", "the card's metadata; copies of an earlier card said MIT"
    ),
    "m-a-p/MERT-v1-95M": Licence("cc-by-nc-4.0", True, "https://huggingface.co/m-a-p/MERT-v1-95M"),
    "m-a-p/MERT-v1-330M": Licence("cc-by-nc-4.0", True, "https://huggingface.co/m-a-p/MERT-v1-330M"),
    "facebook/encodec_24khz": Licence(
        None,
        None,
        "https://huggingface.co/facebook/encodec_24khz",
        "its model card states no licence (https://huggingface.co/facebook/encodec_24khz/discussions/4); "
        "the authors' repository releases its code under MIT and says nothing of the weights (https://github.com/facebookresearch/encodec#license)",
    ),
    "facebook/encodec_48khz": Licence("mit", False, "https://huggingface.co/facebook/encodec_48khz"),
    "facebook/encodec_32khz": Licence(
        "cc-by-nc-4.0",
        True,
        "https://github.com/facebookresearch/audiocraft#license",
        "its model card states none; it is MusicGen's codec, and audiocraft releases its model weights under CC-BY-NC 4.0",
    ),
}
ROLES = {"clap": "CLAP (text and audio conditioning)", "mert": "MERT (semantic tokens)", "encodec": "Encodec (acoustic tokens, decoding)"}


def backbone_licence(model: str) -> Licence:
    """The licence of a backbone named in a tokenizer config: looked up for the hub ids above; ``"random"``
    (built offline, no pretrained weights) inherits nothing; anything else is not verified."""
    if model == "random":
        return Licence("none inherited", False, "", "built by musiclm from a config with random weights: no pretrained weights")
    if model in BACKBONE_LICENCES:
        return BACKBONE_LICENCES[model]
    return Licence(None, None, "", "not a backbone whose licence musiclm has looked up (a local folder or another hub id)")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _metrics(run: Path) -> dict[str, Any]:
    """The last held-out loss (and its step), the best one, and the last training loss of ``run/metrics.jsonl``."""
    out: dict[str, Any] = {}
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if "val/loss" in row:
            out["val_loss"], out["val_step"] = row["val/loss"], row.get("step")
        if "val/best" in row:
            out["val_best"] = row["val/best"]
        if "train/loss" in row:
            out["train_loss"], out["train_step"] = row["train/loss"], row.get("step")
    return out


def _provenance(record: dict[str, Any]) -> str:
    """Where a fine-tuned or merged stage came from, as its run.json names it (run folder names only: paths stay private)."""
    text = ""
    base = record.get("init_from")
    if isinstance(base, dict):
        text += f" Fine-tuned from step {base.get('step')} of run `{Path(str(base.get('run', '?'))).name}` (weights sha256 `{str(base.get('sha256', ''))[:16]}`)."
    lora = record.get("lora")
    if isinstance(lora, dict):
        text += f" LoRA: {', '.join(f'{k} {v}' for k, v in lora.items() if not isinstance(v, (dict, list)))}."
    merged = record.get("merged_from")
    if isinstance(merged, dict):
        text += f" Merged from step {merged.get('step')} of run `{Path(str(merged.get('run', '?'))).name}`."
    return text


def _count(x: Any) -> str:
    return f"{x:,}" if isinstance(x, int) else "?"


def _fmt(x: Any, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) else "—"


def model_card(runs: str | Path, repo_id: str | None = None) -> str:
    """A model card (README.md with hub metadata) for the model folder ``runs``, written from what the run
    folders know: stages, sizes, steps, held-out losses, the tokenizer and its backbones with their licences as
    their authors state them, the training corpus (its manifest) and its licence files, intended use and limits."""
    from musiclm.shards.manifest import read_manifest

    runs = Path(runs)
    stages = _stage_runs(runs)
    tok_dir = _tokenizer_dir(runs, stages)
    tok = json.loads((tok_dir / "tokenizer.json").read_text())
    config = tok.get("config", {})
    name = repo_id or runs.resolve().name
    lines: list[str] = []
    add = lines.append

    backbones = {b: config.get(b, {}).get("model", "?") for b in ROLES}
    licences = {b: backbone_licence(m) for b, m in backbones.items()}
    restricted = [b for b, lic in licences.items() if lic.non_commercial]
    unknown = [b for b, lic in licences.items() if lic.non_commercial is None]

    add("---")
    add("license: other")
    add(f"license_name: {'non-commercial' if restricted else 'see-model-card'}")
    add("library_name: musiclm")
    add("pipeline_tag: text-to-audio")
    add("tags:\n- music\n- text-to-music\n- musiclm")
    add("---")
    add("")
    add(f"# {name}")
    add("")
    add(
        f"A MusicLM-style text-to-music model trained with musiclm {_version()}: "
        "CLAP text tokens → semantic stage → coarse acoustic stage → fine acoustic stage → Encodec decoding."
    )
    add("")
    add("```python")
    add("from musiclm import MusicLM")
    add("")
    add(f'lm = MusicLM.from_pretrained("{name}")  # revision="<commit sha>" pins this version')
    add('audio = lm.generate("a calm piano over soft rain", seconds=10)')
    add("```")
    add("")

    add("## Stages")
    add("")
    add("| stage | parameters | layers | width | heads | steps trained | batch (windows) | held-out loss | best held-out loss | last training loss |")
    add("|---|---|---|---|---|---|---|---|---|---|")
    for s in stages.values():
        cfg = s.record.get("config", {})
        model, train = cfg.get("model", {}), cfg.get("train", {})
        m = _metrics(s.run)
        batch = train.get("batch_size", 0) * train.get("grad_accum", 1) * s.record.get("world_size", 1)
        held = f"{_fmt(m.get('val_loss'))} (step {m.get('val_step')})" if "val_loss" in m else "not measured"
        add(
            f"| {s.name} | {_count(s.record.get('parameters'))} | {model.get('n_layers', '?')} | {model.get('d_model', '?')} | {model.get('n_heads', '?')} "
            f"| {_count(s.step)} of {_count(train.get('steps'))} | {batch} | {held} | {_fmt(m.get('val_best'))} | {_fmt(m.get('train_loss'))} |"
        )
    add("")
    for s in stages.values():
        layout = s.record.get("layout", {})
        add(f"- **{s.name}**: {layout.get('description', '')}; held-out data: {s.record.get('validation', 'not recorded')}.{_provenance(s.record)}")
    add("")
    add("Losses are mean cross-entropy (nats) per predicted token, from each run's `metrics.jsonl`.")
    add("")

    add("## Tokenizer")
    add("")
    streams = tok.get("streams", {})
    add(f"Tokenizer fingerprint `{tok.get('fingerprint')}` (format {tok.get('format')}), in `tokenizer/`.")
    add("")
    for stream, st in streams.items():
        rate = f"{st['frame_rate']:g} Hz" if st.get("frame_rate") else f"one row per {st.get('window_seconds', '?')} s window"
        add(f"- {stream}: {st.get('levels')} level(s) of {st.get('codebook_size')} codes, {rate}")
    add("")
    add("| backbone | model | revision | licence (as stated by its authors) | source |")
    add("|---|---|---|---|---|")
    for b, model in backbones.items():
        lic = licences[b]
        revision = "—" if model == "random" else (config.get(b, {}).get("revision") or "not pinned (main)")
        stated = lic.spdx or "not verified"
        if lic.note:
            stated += f" ({lic.note})"
        add(f"| {ROLES[b]} | `{model}` | {revision} | {stated} | {lic.source or '—'} |")
    add("")

    add("## Licences")
    add("")
    add(f"- The musiclm code is licensed under {MUSICLM_LICENCE}; that licence does not cover these weights.")
    for b in restricted:
        lic = licences[b]
        add(
            f"- The weights of `{backbones[b]}` ({ROLES[b]}) are licensed {lic.spdx} by their authors: for non-commercial use only. "
            "That restriction carries over to the tokens computed with them, to the models trained on those tokens "
            "(this one), and to what they generate: this model may be used for non-commercial purposes only."
        )
    for b in unknown:
        add(f"- The licence of `{backbones[b]}` ({ROLES[b]}) is not verified: check it before any use beyond research.")
    if not restricted and not unknown:
        add("- No backbone restricts use beyond the terms listed above.")
    add("- The training audio keeps its own licences (below): a model trained on it may be bound by them.")
    add("")

    add("## Training data")
    add("")
    manifests = {s.name: read_manifest(s.run) for s in stages.values()}
    by_hash: dict[str | None, list[str]] = {}
    for stage, m in manifests.items():
        by_hash.setdefault(m["manifest_sha256"] if m else None, []).append(stage)
    for digest, which in by_hash.items():
        m = manifests[which[0]]
        label = ", ".join(which)
        if m is None:
            add(f"- **{label}**: no corpus manifest was carried into the run (tokenized before musiclm wrote manifests): the training data is not described.")
            continue
        hours = m.get("seconds", 0) / 3600
        add(
            f"- **{label}**: {m['files'] - m.get('failed', 0):,} audio files ({hours:.2f} h; {m.get('failed', 0)} refused, {m.get('bytes', 0) / 1e6:,.1f} MB), "
            f"corpus manifest sha256 `{digest}` (paths: {m['paths']}), written by musiclm {m.get('musiclm_version')} on {m.get('created')}."
        )
        if m.get("licences"):
            add("  Licence files found in the corpus:")
            for lic in m["licences"]:
                add(f"  - `{lic['path']}` (sha256 `{lic['sha256'][:16]}`): \"{lic.get('first_line', '')}\"")
        else:
            add("  No licence file was found in the corpus tree: the licence of the training audio is not recorded.")
    add("")
    add("The manifest hash names the exact files (path, size, sha256) the stages learnt from; each stage folder holds its manifest summary.")
    add("")

    add("## Intended use and limits")
    add("")
    add("- Intended for research on and experiments with text-to-music generation, within the licences above.")
    add(
        "- It generates music like its training corpus and no other: styles, instruments and recording conditions absent "
        "from that corpus will not come out, and a small corpus can be reproduced closely. Check outputs before publishing them."
    )
    add(
        "- Text reaches the model only through CLAP's text embedding quantized with codebooks fitted on audio: prompts far "
        "from the corpus's audio are followed loosely. No captions were used in training."
    )
    add("- Not evaluated for fairness, for memorisation of the training audio, or on any benchmark beyond the held-out losses above.")
    add("- Not for generating audio that imitates a specific artist or passes off as a real recording.")
    add("")
    return "\n".join(lines)
