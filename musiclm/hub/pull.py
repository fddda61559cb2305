"""Pull a model from the Hugging Face Hub: a local folder or a hub repo id ``owner/name`` → a model folder on disk.

Layer: hub (imports the base layer; :mod:`musiclm.hub.model_folder` for where a model folder keeps its tokenizer).

Pulling goes through ``huggingface_hub.snapshot_download``: the cache (``HF_HUB_CACHE`` / ``HF_HOME``),
offline mode (``HF_HUB_OFFLINE=1``), tokens and endpoints are the library's own. ``revision`` (a branch,
tag or commit sha) pins what is pulled. A pulled tokenizer whose config has ``trust_remote_code`` (MERT-v1)
would run code from the hub when it loads; that needs ``trust_remote_code=True`` (``--trust-remote-code``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from musiclm.errors import UserError
from musiclm.hub.model_folder import tokenizer_copies

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


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
    for record_path in [copy / "tokenizer.json" for copy in tokenizer_copies(folder)]:
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
