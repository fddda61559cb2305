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
from musiclm.models.backbones import RANDOM, Clap, Encodec, Mert, encodec_latents, load_clap, load_encodec, load_mert
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

SEEDS = {"clap": 0, "mert": 1, "encodec": 2}


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
        mert: Mert,
        encodec: Encodec,
        quantizers: dict[str, np.ndarray] | None = None,
        device: str | torch.device = "cpu",
        record: dict[str, Any] | None = None,
    ):
        self.cfg = cfg
        self.clap, self.mert, self.encodec = clap, mert, encodec
        self.quantizers = quantizers
        self.device = torch.device(device)
        self.record = record  # the parsed tokenizer.json when loaded from a folder
        self.backoffs: list[str] = []  # batch-size back-offs after CUDA out-of-memory, one line each
        self._max_rows: dict[str, int] = {}  # backbone -> rows per call after a back-off
        for m in (clap.model, mert.model, encodec.model):
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
            load_mert(cfg.mert, saved("mert", cfg.mert), seed=SEEDS["mert"]),
            load_encodec(cfg.encodec, saved("encodec", cfg.encodec), seed=SEEDS["encodec"]),
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
            sub = record["backbones"][name].get("path")
            if not sub:
                return load(spec, None)  # a hub id: loading errors are the backbone loader's to tell
            try:
                return load(spec, folder / sub)
            except Exception as e:  # noqa: BLE001 - a saved backbone that passed its checks and still fails to load is damaged
                raise DamagedFile(folder / sub, f"cannot be loaded: {error_line(e)}", ADVICE) from None

        return cls(
            cfg,
            backbone("clap", load_clap, cfg.clap),
            backbone("mert", load_mert, cfg.mert),
            backbone("encodec", load_encodec, cfg.encodec),
            quantizers=quantizers,
            device=device,
            record=record,
        )

    def save_backbones(self, folder: Path) -> None:
        """Save the backbones built offline (random) into ``folder`` so that they load from there."""
        for name, spec, bb in (("clap", self.cfg.clap, self.clap), ("mert", self.cfg.mert, self.mert), ("encodec", self.cfg.encodec, self.encodec)):
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
        for name, spec in (("clap", self.cfg.clap), ("mert", self.cfg.mert), ("encodec", self.cfg.encodec)):
            entry: dict[str, Any] = {"model": spec.model, "revision": spec.revision, "path": None}
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
        return tuple(sorted({self.clap.sample_rate, self.mert.sample_rate, self.encodec.sample_rate}))

    def streams(self) -> dict[str, dict[str, Any]]:
        c = self.cfg
        return {
            "semantic": {
                "levels": 1,
                "codebook_size": c.mert.codebook_size,
                "frame_rate": self.mert.frame_rate,
                "sample_rate": self.mert.sample_rate,
                "layer": c.mert.layer,
            },
            "acoustic": {
                "levels": c.encodec.num_quantizers,
                "codebook_size": self.encodec.codebook_size,
                "frame_rate": self.encodec.frame_rate,
                "sample_rate": self.encodec.sample_rate,
                "coarse_levels": c.encodec.coarse_quantizers,
                "bandwidth": self.encodec.bandwidth,
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
        their own setting). bf16 and fp16 run under autocast on the tokenizer's device, for MERT
        and CLAP only (``lowered``): under autocast Encodec's residual codes come out different
        from fp32's for most frames (8% of level-0 codes agreed in bf16, 16-40% in fp16;
        benchmarks/bench_agreement.py), so Encodec always runs in fp32."""
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
    def mert_features(self, audio: np.ndarray) -> torch.Tensor:
        """MERT hidden states of the configured layer: [B, samples] or [samples] at the MERT rate → [B, T_s, D]."""
        audio = np.atleast_2d(audio)
        fe = self.mert.features
        x = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32)).to(self.device)
        if getattr(fe, "do_normalize", False):
            x = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True, unbiased=False) + 1e-7)
        with self.precision():
            out = self.mert.model(x, output_hidden_states=True)
        return out.hidden_states[self.mert.layer].float()

    @torch.inference_mode()
    def encode_acoustic(self, audio: np.ndarray) -> torch.Tensor:
        """Encodec codes: [B, samples] or [samples] at the codec rate → [B, Q, T_a] int64."""
        x = torch.from_numpy(np.ascontiguousarray(np.atleast_2d(audio), dtype=np.float32)).to(self.device)
        with self.precision(lowered=False):
            out = self.encodec.model.encode(self.encodec.model_input(x), bandwidth=self.encodec.bandwidth)
        return out.audio_codes[0][:, : self.encodec.num_quantizers]

    @torch.inference_mode()
    def decode_acoustic(self, codes: torch.Tensor | np.ndarray) -> np.ndarray:
        """Waveforms [B, samples] float32 at the codec rate from codes [B, Q, T_a] (or [Q, T_a])."""
        codes = torch.as_tensor(np.asarray(codes, dtype=np.int64) if isinstance(codes, np.ndarray) else codes).to(self.device)
        if codes.dim() == 2:
            codes = codes[None]
        audio = self.encodec.model.decode(codes[None], [None]).audio_values  # [B, C, samples]
        return audio.mean(1).float().cpu().numpy()

    # ---- tokens -------------------------------------------------------------------
    def _need_quantizers(self) -> dict[str, torch.Tensor]:
        if self.quantizers is None:
            raise RuntimeError("quantizers are not fitted")
        if not hasattr(self, "_q"):
            self._q = {k: torch.from_numpy(v).to(self.device) for k, v in self.quantizers.items()}
        return self._q

    def semantic_codes(self, features: torch.Tensor) -> torch.Tensor:
        """k-means codes of MERT features [..., D] → [...] int64."""
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

        MERT and Encodec take clips of equal length together, never padded: MERT normalises each
        row and attends over all of it, so padding would change its features. CLAP windows all
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
            codes = self.semantic_codes(self.mert_features(np.stack([clips[i][self.mert.sample_rate] for i in rows])))
            return [{"semantic": c.cpu().numpy().astype(np.uint16)} for c in codes]

        def acoustic(rows: list[int]) -> list[dict]:
            codes = self.encode_acoustic(np.stack([clips[i][self.encodec.sample_rate] for i in rows]))
            return [{"acoustic": c.cpu().numpy().astype(np.uint16)} for c in codes]

        for rows in same_length(clips, self.mert.sample_rate):
            merge(rows, self._call_in_parts("MERT", rows, semantic))
        for rows in same_length(clips, self.encodec.sample_rate):
            merge(rows, self._call_in_parts("Encodec", rows, acoustic))
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
        dense hop (``chunk`` windows per call, to bound memory) and, when ``frames``, MERT frames (at
        most ``max_frames``, sampled) and Encodec encoder outputs when Encodec is built offline."""

        def at_most(frames: np.ndarray) -> np.ndarray:  # max_frames of them, drawn without replacement, in order
            return frames if len(frames) <= max_frames else frames[np.sort(rng.choice(len(frames), max_frames, replace=False))]

        windows = self.clap_windows(audio[self.clap.sample_rate], self.cfg.fit.clap_hop_seconds)
        out = {"clap": np.concatenate([self.clap_audio_embed(windows[a : a + chunk]).cpu().numpy() for a in range(0, len(windows), chunk)])}
        if not frames:
            return out
        out["mert"] = at_most(self.mert_features(audio[self.mert.sample_rate])[0].cpu().numpy())
        if self.cfg.encodec.model == RANDOM:
            x = torch.from_numpy(audio[self.encodec.sample_rate][None]).to(self.device)
            out["encodec"] = at_most(encodec_latents(self.encodec, x)[0].cpu().numpy())
        return out
