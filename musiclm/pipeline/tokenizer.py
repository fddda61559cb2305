"""The tokenizer: three frozen backbones plus fitted quantizers, saved as one folder.

The folder's file contract (what it holds, its record and fingerprint, the checked reads) is
:mod:`musiclm.shards.tokenizer_folder`; this module writes the folder (:meth:`Tokenizer.save`) and
loads it back (:meth:`Tokenizer.load`, after :func:`~musiclm.shards.tokenizer_folder.check_folder`).

Audio goes in as mono float32 arrays, one per sample rate the backbones need
(``Tokenizer.sample_rates``); tokens come out as the arrays of a shard sample.

Layer: pipeline (imports the base layer, shards and models).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from musiclm import atomic
from musiclm.config import TokenizeConfig, to_dict, tokenize_config_from_dict
from musiclm.integrity import DamagedFile, FileRecord, write_records
from musiclm.models.clap_mel import ClapMel
from musiclm.models.backbones import RANDOM, Clap, load_clap
from musiclm.models.codec import Codec, load_codec
from musiclm.models.semantic import SemanticModel, load_semantic
from musiclm.pipeline.fit_plan import check_clap_window
from musiclm.pipeline.quantizers import assign, residual_decode, residual_encode
from musiclm.shards.format import TOKENIZER_FILE, TokenInfo
from musiclm.shards.tokenizer_folder import (
    ADVICE,
    FORMAT_VERSION,
    QUANTIZER_FILES,
    RECORDS_FILE,
    check_folder,
    error_line,
    fingerprint,
    load_quantizers,
    tokenizer_folder,
)

SEEDS = {"clap": 0, "semantic": 1, "codec": 2}
BACKBONES = ("clap", "semantic", "codec")  # their names in the record, the config and the folder
OLD_NAMES = {"semantic": "mert", "codec": "encodec"}  # their names in records written before the backbones were pluggable


def same_length(clips: list[dict[int, np.ndarray]], rate: int) -> list[list[int]]:
    """The clips' positions grouped by their length at ``rate``, in order of first appearance."""
    groups: dict[int, list[int]] = {}
    for i, clip in enumerate(clips):
        groups.setdefault(len(clip[rate]), []).append(i)
    return list(groups.values())


class Tokenizer:
    """Backbones + quantizers. ``quantizers`` is None while they are being fitted."""

    def __init__(
        self,
        cfg: TokenizeConfig,
        clap: Clap,
        semantic: SemanticModel,
        codec: Codec,
        quantizers: dict[str, np.ndarray] | None = None,
        device: str | torch.device = "cpu",
        record: dict[str, Any] | None = None,
    ):
        self.cfg = cfg
        self.clap, self.semantic, self.codec = clap, semantic, codec
        self.quantizers = quantizers
        self.device = torch.device(device)
        self.record = record  # the parsed tokenizer.json when loaded from a folder
        self.backoffs: list[str] = []  # batch-size back-offs after CUDA out-of-memory, one line each
        self._max_rows: dict[str, int] = {}  # backbone -> rows per call after a back-off
        for m in (clap.model, semantic.model, codec.model):
            m.to(self.device)
        # again here: a hub backbone's extractor is known only once it has loaded
        check_clap_window(cfg, clap.features.nb_max_samples / clap.sample_rate)

    # ---- construction --------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: TokenizeConfig, device: str = "cpu", folders: Path | None = None) -> Tokenizer:
        """Backbones as the config names them, no quantizers yet. Random backbones are built with
        fixed seeds, or loaded from ``folders/<name>`` where :meth:`save_backbones` put them."""

        def saved(name: str, spec) -> Path | None:
            return folders / name if folders is not None and spec.model == RANDOM else None

        return cls(
            cfg,
            load_clap(cfg.clap, saved("clap", cfg.clap), seed=SEEDS["clap"]),
            load_semantic(cfg.semantic, saved("semantic", cfg.semantic), seed=SEEDS["semantic"]),
            load_codec(cfg.codec, saved("codec", cfg.codec), seed=SEEDS["codec"]),
            device=device,
        )

    @classmethod
    def load(cls, folder: str | Path, device: str = "cpu") -> Tokenizer:
        """A saved tokenizer folder (``DIR/tokenizer``), quantizer checksums verified."""
        folder = tokenizer_folder(folder)
        record = check_folder(folder)
        cfg = tokenize_config_from_dict(record["config"])
        quantizers = load_quantizers(folder)

        def backbone(name: str, load, spec):
            entry = recorded_backbone(record, name)
            sub = entry.get("path")
            if not sub:
                built = load(spec, None)  # a hub id: loading errors are the backbone loader's to tell
            else:
                try:
                    built = load(spec, folder / sub)
                except Exception as e:  # noqa: BLE001 - a saved backbone that passed its checks and still fails to load is damaged
                    raise DamagedFile(folder / sub, f"cannot be loaded: {error_line(e)}", ADVICE) from None
            if entry.get("class") and entry["class"] != type(built.model).__name__:
                raise DamagedFile(
                    folder / TOKENIZER_FILE,
                    f"its {name} backbone was a {entry['class']} but '{spec.model}' now loads a {type(built.model).__name__}",
                    "pin the backbone's revision to the one that tokenized the corpus, or tokenize again",
                )
            return built

        return cls(
            cfg,
            backbone("clap", load_clap, cfg.clap),
            backbone("semantic", load_semantic, cfg.semantic),
            backbone("codec", load_codec, cfg.codec),
            quantizers=quantizers,
            device=device,
            record=record,
        )

    def save_backbones(self, folder: Path) -> None:
        """Save the backbones built offline (random) into ``folder`` so that they load from there."""
        for name in BACKBONES:
            spec, bb = getattr(self.cfg, name), getattr(self, name)
            if spec.model == RANDOM:
                target = folder / name
                if target.exists():
                    shutil.rmtree(target)
                bb.save(target)

    def save(self, folder: str | Path, fit_report: dict[str, Any] | None = None) -> TokenInfo:
        """Write quantizers, random backbones and tokenizer.json; returns the resulting TokenInfo.

        ``fit_report`` (sample sizes, points per code, reconstruction errors) is kept in the record
        as ``fit``, outside the fingerprint: it describes the fit, it does not change token meaning."""
        if self.quantizers is None:
            raise RuntimeError("quantizers are not fitted")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.save_backbones(folder)
        files: dict[str, FileRecord] = {}  # every file written here, for records.json
        for name, fname in QUANTIZER_FILES.items():
            np.save(folder / fname, self.quantizers[name], allow_pickle=False)
            files[fname] = FileRecord.of(folder / fname)
        backbones = {}
        for name in BACKBONES:
            spec = getattr(self.cfg, name)
            entry: dict[str, Any] = {"model": spec.model, "revision": spec.revision, "path": None, "class": type(getattr(self, name).model).__name__}
            if spec.model == RANDOM:
                entry["path"] = name
                saved = {p.name: FileRecord.of(p) for p in sorted((folder / name).iterdir()) if p.is_file()}
                files.update({f"{name}/{fname}": r for fname, r in saved.items()})
                entry["sha256"] = {fname: r.sha256 for fname, r in saved.items()}
            backbones[name] = entry
        record = {
            "format": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "config": to_dict(self.cfg),
            "backbones": backbones,
            "quantizers": {fname: files[fname].sha256 for fname in QUANTIZER_FILES.values()},
            "streams": self.streams(),
            "records": RECORDS_FILE,  # outside the fingerprint: where the files' checksums are, not what tokens mean
        }
        record["fingerprint"] = fingerprint(record)
        if fit_report is not None:
            record["fit"] = fit_report
        atomic.write_text(folder / TOKENIZER_FILE, json.dumps(record, indent=2, sort_keys=True))
        files[TOKENIZER_FILE] = FileRecord.of(folder / TOKENIZER_FILE)
        write_records(folder / RECORDS_FILE, files)  # last: a folder with it is whole
        self.record = record
        return TokenInfo.from_json(record)

    # ---- facts -----------------------------------------------------------------
    @property
    def sample_rates(self) -> tuple[int, ...]:
        return tuple(sorted({self.clap.sample_rate, self.semantic.sample_rate, self.codec.sample_rate}))

    def streams(self) -> dict[str, dict[str, Any]]:
        c = self.cfg
        return {
            "semantic": {
                "levels": 1,
                "codebook_size": c.semantic.codebook_size,
                "frame_rate": self.semantic.frame_rate,
                "sample_rate": self.semantic.sample_rate,
                "layer": c.semantic.layer,
            },
            "acoustic": {
                "levels": c.codec.num_quantizers,
                "codebook_size": self.codec.codebook_size,
                "frame_rate": self.codec.frame_rate,
                "sample_rate": self.codec.sample_rate,
                "coarse_levels": c.codec.coarse_quantizers,
                "bandwidth": self.codec.bandwidth,
            },
            "clap": {
                "levels": c.clap.levels,
                "codebook_size": c.clap.codebook_size,
                "frame_rate": None,
                "sample_rate": self.clap.sample_rate,
                "window_seconds": c.clap.window_seconds,
                "hop_seconds": c.clap.hop_seconds,
                "embed_dim": self.clap.embed_dim,
            },
        }

    @property
    def learns_codebooks(self) -> bool:
        """Whether the fit learns the codec's codebooks: an Encodec built offline has all-zero ones."""
        return self.cfg.codec.model == RANDOM and self.codec.family == "encodec"

    @property
    def info(self) -> TokenInfo:
        if self.record is None:
            raise RuntimeError("tokenizer not saved yet")
        return TokenInfo.from_json(self.record)

    # ---- backbone features ------------------------------------------------------
    @contextmanager
    def precision(self, lowered: bool = True) -> Iterator[None]:
        """The backbones' arithmetic, ``tokenize.precision``, for the calls inside only.

        fp32 is plain fp32 on every device: TF32 flips ~5% of Encodec codes against the CPU, so
        it is off inside (and restored after, so training or generation in the same process keep
        their own setting). bf16 and fp16 run under autocast on the tokenizer's device, for the
        semantic model and CLAP only (``lowered``): under autocast Encodec's residual codes come out different
        from fp32's for most frames (8% of level-0 codes agreed in bf16, 16-40% in fp16;
        benchmarks/bench_agreement.py), so the codec always runs in fp32."""
        dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.cfg.precision] if lowered else None
        cuda = self.device.type == "cuda"
        saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) if cuda else None
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                yield
        finally:
            if saved is not None:
                torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved

    def clap_windows(self, audio: np.ndarray, hop_seconds: float | None = None) -> np.ndarray:
        """Windows of ``audio`` (at the CLAP rate) → [W, window samples]; at least one (repeat-padded).

        The hop is ``tokenize.clap.hop_seconds`` unless ``hop_seconds`` is given (the fit's dense hop)."""
        sr = self.clap.sample_rate
        win = int(round(self.cfg.clap.window_seconds * sr))
        hop = max(1, int(round((self.cfg.clap.hop_seconds if hop_seconds is None else hop_seconds) * sr)))
        if len(audio) <= win:
            return audio[None, :]
        starts = range(0, len(audio) - win + 1, hop)
        return np.stack([audio[s : s + win] for s in starts])

    @torch.inference_mode()
    def clap_audio_embed(self, windows: list[np.ndarray] | np.ndarray) -> torch.Tensor:
        """Normalised CLAP audio embeddings [W, D] of windows at the CLAP rate.

        The log-mel features are computed on the tokenizer's device (:class:`ClapMel`, the feature
        extractor's own computation in torch), so that a GPU is not kept waiting on numpy."""
        if not hasattr(self, "_clap_mel"):
            self._clap_mel = ClapMel(self.clap.features, self.clap.truncation)
        feats = self._clap_mel([torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)).to(self.device) for w in windows])
        with self.precision():
            out = self.clap.model.get_audio_features(**feats)
        return torch.nn.functional.normalize(out.pooler_output.float(), dim=-1)

    @torch.inference_mode()
    def clap_text_embed(self, texts: list[str]) -> torch.Tensor:
        """Normalised CLAP text embeddings [B, D]."""
        tok = self.clap.text_tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        with self.precision():
            out = self.clap.model.get_text_features(input_ids=tok["input_ids"].to(self.device), attention_mask=tok["attention_mask"].to(self.device))
        return torch.nn.functional.normalize(out.pooler_output.float(), dim=-1)

    @torch.inference_mode()
    def semantic_features(self, audio: np.ndarray) -> torch.Tensor:
        """Semantic hidden states of the configured layer: [B, samples] or [samples] at the semantic
        model's rate → [B, T_s, D]."""
        inputs = self.semantic.inputs(audio, self.device)
        with self.precision():
            return self.semantic.hidden(inputs).float()

    @torch.inference_mode()
    def encode_acoustic(self, audio: np.ndarray) -> torch.Tensor:
        """Codec codes: [B, samples] or [samples] at the codec rate → [B, Q, T_a] int64."""
        x = torch.from_numpy(np.ascontiguousarray(np.atleast_2d(audio), dtype=np.float32)).to(self.device)
        with self.precision(lowered=False):
            return self.codec.encode(x)

    @torch.inference_mode()
    def decode_acoustic(self, codes: torch.Tensor | np.ndarray) -> np.ndarray:
        """Waveforms [B, hop x T_a] float32 at the codec rate from codes [B, Q, T_a] (or [Q, T_a])."""
        codes = torch.as_tensor(np.asarray(codes, dtype=np.int64) if isinstance(codes, np.ndarray) else codes).to(self.device)
        if codes.dim() == 2:
            codes = codes[None]
        return self.codec.decode(codes).float().cpu().numpy()

    # ---- tokens -------------------------------------------------------------------
    def _need_quantizers(self) -> dict[str, torch.Tensor]:
        if self.quantizers is None:
            raise RuntimeError("quantizers are not fitted")
        if not hasattr(self, "_q"):
            self._q = {k: torch.from_numpy(v).to(self.device) for k, v in self.quantizers.items()}
        return self._q

    def semantic_codes(self, features: torch.Tensor) -> torch.Tensor:
        """k-means codes of semantic features [..., D] → [...] int64."""
        q = self._need_quantizers()
        mean, std = q["semantic_norm"][0], q["semantic_norm"][1]
        flat = ((features - mean) / std).reshape(-1, features.shape[-1])
        return assign(flat, q["semantic_centroids"]).reshape(features.shape[:-1])

    def clap_codes(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Residual codes of CLAP embeddings [N, D] → [N, L] int64."""
        return residual_encode(embeddings, self._need_quantizers()["clap_codebooks"])

    def clap_embedding(self, codes: np.ndarray) -> np.ndarray:
        """The normalised CLAP embeddings [N, D] float32 that residual codes [N, L] stand for (the sum of
        their centroids): where given tokens sit in CLAP's shared space."""
        emb = residual_decode(np.asarray(codes, dtype=np.int64), self._need_quantizers()["clap_codebooks"].cpu())
        return torch.nn.functional.normalize(emb.float(), dim=-1).numpy()

    def text_tokens(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """CLAP text tokens [B, L] uint16 and embeddings [B, D] float32 for prompts."""
        emb = self.clap_text_embed(texts)
        return self.clap_codes(emb).cpu().numpy().astype(np.uint16), emb.cpu().numpy()

    def tokenize(self, audio: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
        """One clip, ``{sample_rate: mono float32}`` → the arrays of a shard sample."""
        (out,) = self.tokenize_batch([audio])
        if isinstance(out, Exception):
            raise out
        return out

    def tokenize_batch(self, clips: list[dict[int, np.ndarray]], clap_rows: int = 64) -> list[dict[str, np.ndarray] | Exception]:
        """Clips, each ``{sample_rate: mono float32}`` → the arrays of a shard sample each, or the
        exception that clip raised (its neighbours go on).

        The semantic model and the codec take clips of equal length together, never padded: the
        semantic model normalises each row and attends over all of it, so padding would change its
        features. CLAP windows all
        have one length and go ``clap_rows`` at a time. Batching changes float reductions and so,
        now and then, a code against batch-1 calls (README: how often, as measured); a batch
        plan that is the same gives the same tokens.
        """
        out: list[dict[str, np.ndarray] | Exception] = [{} for _ in clips]

        def merge(rows: list[int], results: list) -> None:
            for i, r in zip(rows, results):
                if isinstance(r, Exception):
                    out[i] = r
                elif not isinstance(out[i], Exception):
                    out[i].update(r)

        def semantic(rows: list[int]) -> list[dict]:
            codes = self.semantic_codes(self.semantic_features(np.stack([clips[i][self.semantic.sample_rate] for i in rows])))
            return [{"semantic": c.cpu().numpy().astype(np.uint16)} for c in codes]

        def acoustic(rows: list[int]) -> list[dict]:
            codes = self.encode_acoustic(np.stack([clips[i][self.codec.sample_rate] for i in rows]))
            return [{"acoustic": c.cpu().numpy().astype(np.uint16)} for c in codes]

        for rows in same_length(clips, self.semantic.sample_rate):
            merge(rows, self._call_in_parts("semantic", rows, semantic))
        for rows in same_length(clips, self.codec.sample_rate):
            merge(rows, self._call_in_parts("codec", rows, acoustic))
        windows = [self.clap_windows(clip[self.clap.sample_rate]) for clip in clips]
        owner = np.concatenate([np.full(len(w), i) for i, w in enumerate(windows)])
        flat = [w for ws in windows for w in ws]  # a clip shorter than a window gives one shorter window
        emb = torch.zeros(len(flat), self.clap.embed_dim, dtype=torch.float16)

        def embed(rows: list[int]) -> list[None]:
            # codes come from the float16 embedding that is stored, so that they are a function of it alone
            emb[rows] = self.clap_audio_embed([flat[w] for w in rows]).half().cpu()
            return [None] * len(rows)

        for a in range(0, len(flat), clap_rows):
            rows = list(range(a, min(a + clap_rows, len(flat))))
            for w, r in zip(rows, self._call_in_parts("CLAP", rows, embed)):
                if isinstance(r, Exception):
                    out[int(owner[w])] = r
        codes = self.clap_codes(emb.float().to(self.device)).cpu().numpy().astype(np.uint16)
        for i in range(len(clips)):
            if not isinstance(out[i], Exception):
                mine = owner == i
                out[i].update(clap=codes[mine], clap_emb=emb[mine].numpy())
        return out

    def _call_in_parts(self, name: str, rows: list[int], call) -> list:
        """``call(rows)`` → one result per row, or the exception of the row that raised it.
        After CUDA out-of-memory the calls take fewer rows, for the rest of the run."""
        results: list = []
        step = min(len(rows), self._max_rows.get(name, len(rows)))
        while len(results) < len(rows):
            part = rows[len(results) : len(results) + step]
            try:
                results.extend(call(part))
            except torch.cuda.OutOfMemoryError as e:
                if step == 1:
                    results.append(e)
                    continue
                if name not in self._max_rows:  # said once per backbone; smaller steps follow silently
                    self.backoffs.append(f"{name}: CUDA out of memory at {step} rows per call, fewer from now on")
                step = max(1, step // 2)
                self._max_rows[name] = step
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
            except Exception as e:  # noqa: BLE001 - find the row that fails; the others go on
                if len(part) == 1:
                    results.append(e)
                    continue
                for i in part:
                    try:
                        results.extend(call([i]))
                    except Exception as e:  # noqa: BLE001
                        results.append(e)
        return results

    def fit_features(self, audio: dict[int, np.ndarray], max_frames: int, rng: np.random.Generator, frames: bool = True, chunk: int = 16) -> dict[str, np.ndarray]:
        """Features that quantizers are fitted on, for one clip: CLAP window embeddings at the fit's
        dense hop (``chunk`` windows per call, to bound memory) and, when ``frames``, semantic frames (at
        most ``max_frames``, sampled) and Encodec encoder outputs when Encodec is built offline."""

        def at_most(frames: np.ndarray) -> np.ndarray:  # max_frames of them, drawn without replacement, in order
            return frames if len(frames) <= max_frames else frames[np.sort(rng.choice(len(frames), max_frames, replace=False))]

        windows = self.clap_windows(audio[self.clap.sample_rate], self.cfg.fit.clap_hop_seconds)
        out = {"clap": np.concatenate([self.clap_audio_embed(windows[a : a + chunk]).cpu().numpy() for a in range(0, len(windows), chunk)])}
        if not frames:
            return out
        out["semantic"] = at_most(self.semantic_features(audio[self.semantic.sample_rate])[0].cpu().numpy())
        if self.learns_codebooks:
            x = torch.from_numpy(audio[self.codec.sample_rate][None]).to(self.device)
            with torch.inference_mode():
                out["codec"] = at_most(self.codec.latents(x)[0].cpu().numpy())
        return out


def recorded_backbone(record: dict[str, Any], name: str) -> dict[str, Any]:
    """Backbone ``name``'s entry in a tokenizer record, under its present or its old name."""
    backbones = record["backbones"]
    return backbones[name] if name in backbones else backbones[OLD_NAMES[name]]
