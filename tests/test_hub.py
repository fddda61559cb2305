"""Sharing through the Hugging Face Hub, without the network: pull from a cache laid out as the hub lays it
out, push to a hub served by the test on localhost, and the model card written from real (tiny) runs.

The session runs with HF_HUB_OFFLINE=1 (conftest); only the push test turns it off, with every endpoint
pointed at its own server on 127.0.0.1.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import soundfile as sf
import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file, save_file

from musiclm import MusicLM
from musiclm.config import STAGES, load_config
from musiclm.errors import UserError
from musiclm.hub.card import BACKBONE_LICENCES, model_card
from musiclm.hub.model_folder import chosen_stages, find_tokenizer, own_tokenizer, stage_folders, stage_source, tokenizer_with
from musiclm.hub.pull import resolve_model
from musiclm.hub.push import push, push_operations
from musiclm.integrity import FileRecord, write_records
from musiclm.shards.manifest import FileFacts, carry_manifest, read_manifest, write_manifest
from tests.factories import materialize

REPO = "musiclm-tests/tiny"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: torch on one thread for the whole module


@pytest.fixture(scope="module")
def runs(trained_runs) -> Path:
    return trained_runs


def test_every_trained_run_carries_its_corpus_manifest(runs, tokenized):
    data, _ = tokenized
    corpus = read_manifest(data)
    assert corpus is not None and corpus["files"] > 0
    for stage in STAGES:
        assert read_manifest(runs / stage) == corpus


def hub_cache(cache: Path, repo_id: str, commits: dict[str, Path], refs: dict[str, str]) -> Path:
    """Lay ``commits`` ({sha: folder of files}) out as huggingface_hub's cache does:
    ``models--owner--name/{blobs/<hash>, snapshots/<sha>/<path> -> ../../blobs/<hash>, refs/<name>}``."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for sha, folder in commits.items():
        for src in sorted(p for p in folder.rglob("*") if p.is_file()):
            data = src.read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            link = repo / "snapshots" / sha / src.relative_to(folder)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(Path(*[".."] * (len(src.relative_to(folder).parts) + 1), "blobs", blob.name))
    for name, sha in refs.items():
        (repo / "refs" / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / name).write_text(sha)
    return repo


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache for this test, found by huggingface_hub through HF_HOME / HF_HUB_CACHE, offline."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads these once, at import (before this test set them)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def semantic_weights(lm: MusicLM) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in lm.stages["semantic"].model.state_dict().items()}


SHA_A, SHA_B = "a" * 40, "b" * 40


# ---- the model folder --------------------------------------------------------------------------------------------------


def test_a_model_folder_needs_semantic_and_coarse_and_may_lack_fine(tmp_path):
    model = tmp_path / "model"
    (model / "semantic").mkdir(parents=True)
    with pytest.raises(UserError, match="no coarse stage: .* has no coarse/ run folder"):
        stage_folders(model)
    (model / "coarse").mkdir()
    assert stage_folders(model) == {"semantic": model / "semantic", "coarse": model / "coarse"}
    assert own_tokenizer(model) is None
    (model / "tokenizer").mkdir()
    assert own_tokenizer(model) == model / "tokenizer"


def test_generate_takes_each_stage_given_else_the_model_folders(tmp_path):
    model = tmp_path / "model"
    for stage in ("semantic", "coarse"):
        (model / stage).mkdir(parents=True)
    other = tmp_path / "other-coarse"
    other.mkdir()
    assert chosen_stages(model, {"coarse": other}, coarse_only=True) == {"semantic": model / "semantic", "coarse": other, "fine": None}
    with pytest.raises(UserError, match="no fine stage: .* does not exist .or generate with --coarse-only."):
        chosen_stages(model, {})
    with pytest.raises(UserError, match="pass --model DIR holding semantic/ or --semantic RUN"):
        chosen_stages(None, {"coarse": other})


def test_the_tokenizer_is_found_by_fingerprint_and_a_gone_one_is_refused(runs, tmp_path):
    fingerprint = json.loads((runs / "semantic" / "run.json").read_text())["fingerprint"]
    assert find_tokenizer([runs / "semantic"], fingerprint) == runs / "semantic" / "tokenizer"
    assert tokenizer_with([runs / "nowhere", runs / "coarse" / "tokenizer"], fingerprint) == runs / "coarse" / "tokenizer"
    assert tokenizer_with([runs / "coarse" / "tokenizer"], "0" * 16) is None
    copy = Path(shutil.copytree(runs / "semantic" / "tokenizer", tmp_path / "tokenizer"))
    (copy / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="tokenizer.json is missing"):
        tokenizer_with([copy, runs / "coarse" / "tokenizer"], fingerprint)
    with pytest.raises(UserError, match="cannot find the tokenizer .fingerprint 0000000000000000. these stages were trained with; looked in"):
        find_tokenizer([runs / "semantic"], "0" * 16)


# ---- pull --------------------------------------------------------------------------------------------------------------


def test_a_hub_id_loads_from_the_cache_offline_at_the_pinned_revision(runs, offline_cache, tmp_path):
    a = materialize(push_operations(runs, REPO), tmp_path / "commit-a")
    b = materialize(push_operations(runs, REPO), tmp_path / "commit-b")
    weights = stage_source(b / "semantic") / "model.safetensors"
    later = {k: v + 0.5 for k, v in load_file(weights).items()}  # a later commit: other semantic weights
    save_file(later, str(weights))
    write_records(weights.parent / "records.json", {"model.safetensors": FileRecord.of(weights)})  # as that commit's push records them
    hub_cache(offline_cache, REPO, {SHA_A: a, SHA_B: b}, refs={"main": SHA_B, "v1": SHA_A})

    local = MusicLM.from_pretrained(runs, device="cpu", precision="fp32")
    at_main = MusicLM.from_pretrained(REPO, device="cpu", precision="fp32")
    pinned = MusicLM.from_pretrained(REPO, device="cpu", precision="fp32", revision=SHA_A)
    tagged = MusicLM.from_pretrained(REPO, device="cpu", precision="fp32", revision="v1")
    assert str(pinned.tokenizer_path).startswith(str(offline_cache / "models--musiclm-tests--tiny" / "snapshots" / SHA_A))
    for k, v in semantic_weights(at_main).items():
        assert torch.equal(v, later[k])
    for lm in (pinned, tagged):
        for k, v in semantic_weights(lm).items():
            assert torch.equal(v, semantic_weights(local)[k])
    # the pulled model is the trained one: the same audio from the same seed
    got, _ = pinned.generate("a calm piano", 0.5, seed=3)
    want, _ = local.generate("a calm piano", 0.5, seed=3)
    assert np.array_equal(got, want)


def test_pull_errors_are_one_line(runs, offline_cache, tmp_path):
    with pytest.raises(UserError, match="HF_HUB_OFFLINE is set") as e:
        resolve_model("nobody/nothing")
    assert "\n" not in str(e.value) and "Hugging Face cache" in str(e.value)
    hub_cache(offline_cache, REPO, {SHA_A: materialize(push_operations(runs, REPO), tmp_path / "a")}, refs={"main": SHA_A})
    with pytest.raises(UserError, match="at revision v9"):
        resolve_model(REPO, revision="v9")
    with pytest.raises(UserError, match="not a hub id"):
        resolve_model(str(tmp_path / "no-such-model"))
    with pytest.raises(UserError, match="drop --revision"):
        resolve_model(runs, revision="main")
    assert resolve_model(runs) == runs


def test_a_pulled_tokenizer_that_runs_remote_code_needs_the_flag(runs, offline_cache, tmp_path):
    folder = materialize(push_operations(runs, REPO), tmp_path / "commit")
    record_path = folder / "tokenizer" / "tokenizer.json"
    record = json.loads(record_path.read_text())
    record["config"]["semantic"].update(model="m-a-p/MERT-v1-95M", trust_remote_code=True)
    record_path.write_text(json.dumps(record))
    hub_cache(offline_cache, REPO, {SHA_A: folder}, refs={"main": SHA_A})
    with pytest.raises(UserError) as e:
        MusicLM.from_pretrained(REPO, device="cpu")
    assert str(e.value).count("\n") == 0
    assert "--trust-remote-code" in str(e.value) and "tokenize.semantic.trust_remote_code" in str(e.value) and "MERT-v1-95M" in str(e.value)
    assert resolve_model(REPO, trust_remote_code=True).name == SHA_A
    # a local folder is the user's own: it is not second-guessed
    local = shutil.copytree(folder, tmp_path / "local")
    assert resolve_model(local) == local


# ---- push --------------------------------------------------------------------------------------------------------------


def test_push_commits_weights_tokenizer_and_card_in_one_commit(runs, monkeypatch):
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    calls: dict[str, list] = {"create_repo": [], "create_branch": [], "create_commit": []}
    old_step = "semantic/checkpoints/step-000000002/model.safetensors"
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls["create_repo"].append((repo_id, kw)))
    monkeypatch.setattr(HfApi, "create_branch", lambda self, repo_id, **kw: calls["create_branch"].append((repo_id, kw)))
    monkeypatch.setattr(HfApi, "list_repo_files", lambda self, repo_id, **kw: [".gitattributes", "notes.md", "README.md", old_step])

    class Info:
        oid = "c" * 40

    def create_commit(self, repo_id, operations, **kw):
        calls["create_commit"].append((repo_id, list(operations), kw, self.endpoint, self.token))
        return Info()

    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    oid = push(runs, REPO, revision="v2", token="hf_test", private=True, endpoint="http://127.0.0.1:9")
    assert oid == "c" * 40
    assert calls["create_repo"] == [(REPO, {"private": True, "exist_ok": True, "repo_type": "model"})]
    assert calls["create_branch"] == [(REPO, {"branch": "v2", "exist_ok": True})]
    [(repo_id, ops, kw, endpoint, token)] = calls["create_commit"]
    assert (repo_id, kw["revision"], endpoint, token) == (REPO, "v2", "http://127.0.0.1:9", "hf_test")
    added = {op.path_in_repo: op for op in ops if isinstance(op, CommitOperationAdd)}
    assert [op.path_in_repo for op in ops if isinstance(op, CommitOperationDelete)] == [old_step]
    for stage in STAGES:
        weights = [p for p in added if p.startswith(f"{stage}/checkpoints/step-") and p.endswith("/model.safetensors")]
        assert len(weights) == 1, "only the newest checkpoint's weights"
        step = weights[0].split("/")[2]
        assert added[f"{stage}/checkpoints/latest"].path_or_fileobj == f"{step}\n".encode()
        assert Path(added[weights[0]].path_or_fileobj) == runs / stage / "checkpoints" / step / "model.safetensors"
        assert {f"{stage}/run.json", f"{stage}/metrics.jsonl", f"{stage}/manifest.json"} <= set(added)
    assert not [p for p in added if p.endswith("state.pt") or "optim" in p or "/tb/" in p], "no training state is pushed"
    assert {"tokenizer/tokenizer.json", "tokenizer/semantic_kmeans.npy", "tokenizer/clap_rvq.npy"} <= set(added)
    assert added["README.md"].path_or_fileobj.decode() == model_card(runs, repo_id=REPO)


class LocalHub(BaseHTTPRequestHandler):
    """Answers the few hub API calls a push makes (create repo, list files, validate the card's YAML, preupload,
    commit), keeping each commit's files in ``self.server.commits``."""

    def log_message(self, *args):
        pass

    def _send(self, status: int, body) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def do_GET(self):  # noqa: N802
        path = urlparse(self.path).path
        if "/tree/" in path:  # list_repo_files on a new repo: nothing yet
            return self._send(200, [])
        self._send(404, {"error": f"not served: {path}"})

    def do_POST(self):  # noqa: N802
        path = unquote(urlparse(self.path).path)
        body = self._body()
        self.server.seen.append((path, self.headers.get("authorization")))
        if path == "/api/repos/create":
            req = json.loads(body)
            return self._send(200, {"url": f"http://{self.headers['host']}/{req['organization']}/{req['name']}"})
        if path == "/api/validate-yaml":
            return self._send(200, {})
        if "/preupload/" in path:
            files = json.loads(body)["files"]
            return self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
        if "/commit/" in path:
            lines = [json.loads(line) for line in body.decode().splitlines()]
            files = {x["value"]["path"]: base64.b64decode(x["value"]["content"]) for x in lines if x["key"] == "file"}
            oid = hashlib.sha1(body).hexdigest()
            self.server.commits[oid] = {"files": files, "header": lines[0]["value"], "revision": path.rsplit("/", 1)[1]}
            return self._send(200, {"commitUrl": f"http://{self.headers['host']}/{REPO}/commit/{oid}", "commitOid": oid})
        self._send(404, {"error": f"not served: {path}"})


def test_push_to_a_local_hub_then_pull_the_commit_back(runs, offline_cache, tmp_path, monkeypatch, capsys):
    """Through the command line: musiclm push, then musiclm generate --model OWNER/NAME --revision SHA."""
    from musiclm.cli import main

    from huggingface_hub import constants

    server = ThreadingHTTPServer(("127.0.0.1", 0), LocalHub)
    server.commits, server.seen = {}, []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)  # whatever the client calls goes to this server
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    try:
        main(["push", str(runs), REPO, "--token", "hf_local", "--endpoint", endpoint])
    finally:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        server.shutdown()
    [oid] = list(server.commits)  # one commit
    commit = server.commits[oid]
    assert f"pushed {REPO} at {oid}" in capsys.readouterr().out
    assert commit["header"]["summary"].startswith("musiclm ") and "semantic step 4" in commit["header"]["summary"]
    assert {p for p, _ in server.seen} >= {"/api/repos/create", f"/api/models/{REPO}/commit/main"}
    assert all(auth == "Bearer hf_local" for _, auth in server.seen)
    files = commit["files"]
    assert not [p for p in files if "state.pt" in p]
    assert files["README.md"].decode().startswith("---\nlicense: other\n")
    for stage in STAGES:
        step = files[f"{stage}/checkpoints/latest"].decode().strip()
        assert files[f"{stage}/checkpoints/{step}/model.safetensors"] == (runs / stage / "checkpoints" / step / "model.safetensors").read_bytes()

    # what was pushed is a model: lay the commit out as the cache would after a download, and load it offline
    folder = tmp_path / "pushed"
    for p, data in files.items():
        (folder / p).parent.mkdir(parents=True, exist_ok=True)
        (folder / p).write_bytes(data)
    hub_cache(offline_cache, REPO, {oid: folder}, refs={"main": oid})
    lm = MusicLM.from_pretrained(REPO, device="cpu", precision="fp32", revision=oid)
    local = MusicLM.from_pretrained(runs, device="cpu", precision="fp32")
    for name in STAGES:
        a, b = lm.stages[name].model.state_dict(), local.stages[name].model.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b)
    assert read_manifest(Path(lm.stages["semantic"].run)) == read_manifest(runs / "semantic")
    out = tmp_path / "pulled.wav"
    main(["generate", "a calm piano", "--model", REPO, "--revision", oid, "--seconds", "0.5", "--out", str(out), "--precision", "fp32", "--seed", "3"])
    want, _ = local.generate("a calm piano", 0.5, seed=3)
    got, _ = sf.read(out, dtype="float32")
    assert got.shape == want.shape and np.abs(got - np.clip(want, -1, 1)).max() < 2 / 32767


def test_push_refuses_a_folder_without_a_stage(runs, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(runs / "semantic", partial / "semantic")
    with pytest.raises(UserError, match="no coarse stage"):
        push(partial, REPO)
    with pytest.raises(UserError, match="not a hub repo id"):
        push(runs, "just-a-name")


def test_push_refuses_a_lora_adapter_run_until_it_is_merged(runs, tmp_path):
    """An adapter run's checkpoints hold only its adapter, which needs its base run: pushed alone it would not load."""
    model = tmp_path / "model"
    for stage in STAGES:
        shutil.copytree(runs / stage, model / stage)
    latest = model / "coarse" / "checkpoints" / (model / "coarse" / "checkpoints" / "latest").read_text().strip()
    (latest / "model.safetensors").rename(latest / "adapter.safetensors")
    with pytest.raises(UserError, match="no full weights .* merge it") as e:
        push(model, REPO)
    assert "\n" not in str(e.value)


# ---- the model card ----------------------------------------------------------------------------------------------------


def test_the_card_says_what_the_runs_know(runs, tokenized):
    from huggingface_hub import ModelCard

    data, _ = tokenized
    card = model_card(runs, repo_id=REPO)
    assert ModelCard(card).data.to_dict()["license"] == "other"
    manifest = read_manifest(data)
    for stage in STAGES:
        run = json.loads((runs / stage / "run.json").read_text())
        metrics = [json.loads(line) for line in (runs / stage / "metrics.jsonl").read_text().splitlines()]
        val = [m for m in metrics if "val/loss" in m][-1]
        row = next(line for line in card.splitlines() if line.startswith(f"| {stage} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == f"{run['parameters']:,}" and cells[2] == str(run["config"]["model"]["n_layers"])
        assert cells[5] == "4 of 4"
        assert cells[7] == f"{val['val/loss']:.4f} (step {val['step']})"
    tok = json.loads((data / "tokenizer" / "tokenizer.json").read_text())
    assert f"`{tok['fingerprint']}`" in card
    assert card.count("| `random` | — | none inherited") == 3  # the tiny backbones are built offline
    assert f"manifest sha256 `{manifest['manifest_sha256']}`" in card and "**semantic, coarse, fine**" in card
    assert f"{manifest['files'] - manifest['failed']:,} audio files" in card
    assert "No licence file was found in the corpus tree" in card
    assert "## Intended use and limits" in card and "Apache-2.0" in card


def model_with_one_tokenizer(runs: Path, tmp_path: Path) -> tuple[Path, dict]:
    """A copy of ``runs`` whose stages share one ``tokenizer/`` (as a pushed model holds it), and its parsed record."""
    model = shutil.copytree(runs, tmp_path / "model")
    for stage in STAGES:
        shutil.rmtree(model / stage / "tokenizer")
    shutil.copytree(runs / "semantic" / "tokenizer", model / "tokenizer")
    return model, json.loads((model / "tokenizer" / "tokenizer.json").read_text())


def test_the_card_states_backbone_licences_with_sources_and_carries_non_commercial_terms(runs, tmp_path):
    model, record = model_with_one_tokenizer(runs, tmp_path)
    # a tokenizer written before the backbones were pluggable: its config and backbones say mert and encodec
    record["config"]["mert"], record["config"]["encodec"] = record["config"].pop("semantic"), record["config"].pop("codec")
    record["backbones"] = {"clap": record["backbones"]["clap"], "mert": record["backbones"]["semantic"], "encodec": record["backbones"]["codec"]}
    for entry in record["backbones"].values():
        entry.pop("class")
    record["config"]["clap"]["model"] = "laion/larger_clap_music"
    record["config"]["mert"]["model"] = "m-a-p/MERT-v1-95M"
    record["config"]["encodec"]["model"] = "facebook/encodec_24khz"
    (model / "tokenizer" / "tokenizer.json").write_text(json.dumps(record))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.wav").write_bytes(b"RIFF....")
    (corpus / "LICENSE.txt").write_text("Creative Commons Attribution 4.0 International\n")
    write_manifest(tmp_path, corpus, {"a.wav": FileFacts(None, None, 1.0, "")}, console=Console(quiet=True))
    carry_manifest(tmp_path, model / "semantic")
    for stage in ("coarse", "fine"):
        (model / stage / "manifest.json").unlink()
    run = json.loads((model / "fine" / "run.json").read_text())
    run["init_from"] = {"folder": "/home/someone/private/base-fine/checkpoints/step-000000007", "run": "/home/someone/private/base-fine", "sha256": "ab" * 32, "step": 7}
    (model / "fine" / "run.json").write_text(json.dumps(run))

    card = model_card(model)
    assert "| `laion/larger_clap_music` | not pinned (main) | apache-2.0 | https://huggingface.co/laion/larger_clap_music |" in card
    assert "| MERT (semantic tokens) | `m-a-p/MERT-v1-95M` | not pinned (main) | cc-by-nc-4.0 | https://huggingface.co/m-a-p/MERT-v1-95M |" in card
    assert "→ Encodec decoding." in card
    encodec = next(line for line in card.splitlines() if "`facebook/encodec_24khz`" in line and line.startswith("|"))
    assert "| not verified (its model card states no licence" in encodec and "discussions/4" in encodec
    assert "carries over to the tokens computed with them, to the models trained on those tokens" in card
    assert "non-commercial purposes only" in card and "license_name: non-commercial" in card
    assert "The licence of `facebook/encodec_24khz`" in card and "is not verified" in card
    assert '`LICENSE.txt` (sha256 `' in card and '"Creative Commons Attribution 4.0 International"' in card
    assert "**coarse, fine**: no corpus manifest was carried" in card
    assert f"Fine-tuned from step 7 of run `base-fine` (weights sha256 `{'ab' * 8}`)" in card and "/home/someone" not in card
    assert all(lic.source.startswith("https://") for lic in BACKBONE_LICENCES.values())


def test_the_card_of_an_open_model_says_no_backbone_is_non_commercial_and_names_each_with_its_source(runs, tmp_path):
    model, record = model_with_one_tokenizer(runs, tmp_path)
    open_preset = load_config("open").tokenize
    for name, cls in (("clap", "ClapModel"), ("semantic", "Wav2Vec2BertModel"), ("codec", "DacModel")):
        record["config"][name]["model"] = getattr(open_preset, name).model
        record["backbones"][name]["class"] = cls
    (model / "tokenizer" / "tokenizer.json").write_text(json.dumps(record))

    card = model_card(model)
    assert "non-commercial purposes only" not in card and "license_name: non-commercial" not in card
    assert "- No backbone carries a non-commercial licence:" in card
    assert "  - `laion/larger_clap_music` (CLAP (text and audio conditioning)): apache-2.0, as stated at https://huggingface.co/laion/larger_clap_music." in card
    assert "  - `facebook/w2v-bert-2.0` (Wav2Vec2BertModel (semantic tokens)): mit, as stated at https://huggingface.co/facebook/w2v-bert-2.0." in card
    assert "  - `descript/dac_24khz` (DacModel (acoustic tokens, decoding)): mit, as stated at https://huggingface.co/descript/dac_24khz." in card
    assert "| DacModel (acoustic tokens, decoding) | `descript/dac_24khz` | not pinned (main) | mit (its model page states no licence" in card
    assert "→ DacModel decoding." in card
