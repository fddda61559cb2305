"""Push a model folder to the Hugging Face Hub: each stage's newest weights, its run files, the tokenizer and the
model card, as one commit (the repo's layout is in :mod:`musiclm.hub`).

Layer: hub (imports the base layer, ``shards.tokenizer_folder``'s folder check and ``training.checkpoint``).

A push refuses damaged weights or a damaged tokenizer (every file hashed against its record).
"""

from __future__ import annotations

from pathlib import Path

from musiclm.config import STAGES
from musiclm.errors import UserError
from musiclm.hub.card import README, model_card
from musiclm.hub.model_folder import TOKENIZER, StageRun, model_tokenizer, stage_runs
from musiclm.hub.pull import is_repo_id
from musiclm.version import __version__

RUN_FILES = ("run.json", "metrics.jsonl", "manifest.json")  # copied from each run folder when present


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
    stages = stage_runs(runs)
    tokenizer = model_tokenizer(runs, stages)
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
            commit_message=f"musiclm {__version__}: {steps}",
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
