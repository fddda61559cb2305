"""Configs: every number the system uses, loaded from a TOML preset or file.

A config is a tree of frozen dataclasses. Presets live in ``musiclm/configs/<name>.toml``,
package data that an installed wheel carries. A user's config file may start with ``base = "tiny"``
and override any subset of keys; unknown keys and wrong types are refused with
a one-line :class:`~musiclm.errors.UserError`.

The ``tokenize`` subtree decides what tokens *mean*; it is written into
``tokenizer/tokenizer.json`` and everything downstream reads it from there.

Layer: base.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from musiclm.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # package data (pyproject: tool.setuptools.package-data)
STAGES = ("semantic", "coarse", "fine")
PRECISIONS = ("fp32", "bf16", "fp16")  # tokenize.precision: the backbones' arithmetic


@dataclass(frozen=True)
class AudioConfig:
    segment_seconds: float = 30.0  # longer files are split into segments of this length (audio.plan_segments)
    min_seconds: float = 1.0  # shorter files are reported in errors/, not tokenized


@dataclass(frozen=True)
class ClapConfig:
    model: str = "laion/larger_clap_music"  # hub id, local folder, or "random" (built from `arch`)
    revision: str | None = None
    arch: dict = field(default_factory=dict)  # {"audio": {...}, "text": {...}, "projection_dim": N} for "random"
    features: dict = field(default_factory=dict)  # ClapFeatureExtractor kwargs for "random"
    window_seconds: float = 10.0
    hop_seconds: float = 5.0
    levels: int = 12  # residual quantizer depth on the embedding
    codebook_size: int = 1024


@dataclass(frozen=True)
class SemanticConfig:
    """The semantic model: a MERT/HuBERT-family or a w2v-BERT 2.0 checkpoint (models.semantic).

    Its input rate, feature extractor, layer count and frame rate are read from the checkpoint; for
    ``"random"`` from ``arch`` (a config.json as a table: ``model_type`` "hubert", the default, or
    "wav2vec2-bert") and ``features`` (feature extractor settings)."""

    model: str = "m-a-p/MERT-v0"  # hub id, local folder, or "random" (built from `arch`)
    revision: str | None = None
    arch: dict = field(default_factory=dict)  # the model's config for "random"
    features: dict = field(default_factory=dict)  # feature extractor settings for "random" (w2v-BERT)
    trust_remote_code: bool = False  # MERT-v1 needs it (and the network)
    sample_rate: int = 16000  # used for "random" waveform models; a pretrained model's feature extractor overrides it
    layer: int = 7  # hidden_states index fed to k-means
    codebook_size: int = 1024


@dataclass(frozen=True)
class CodecConfig:
    """The codec: Encodec or DAC (models.codec). Sample rate, frame rate, codebooks and codebook size
    are read from the checkpoint; for ``"random"`` from ``arch`` (``model_type`` "encodec", the
    default, or "dac")."""

    model: str = "facebook/encodec_24khz"  # hub id, local folder, or "random" (built from `arch`)
    revision: str | None = None
    arch: dict = field(default_factory=dict)  # the model's config for "random"
    num_quantizers: int = 8  # Q: the codebooks kept per frame
    coarse_quantizers: int = 3  # the first levels form the coarse stream, the rest the fine stream


@dataclass(frozen=True)
class FitConfig:
    """How quantizers are fitted when `musiclm tokenize` is given no tokenizer.

    Files are drawn in a seeded random order until ``max_seconds`` of audio. CLAP windows are
    taken densely (``clap_hop_seconds``) over all of it; semantic frames (and the encoder outputs of
    an offline-built Encodec) over its first ``semantic_seconds`` (``mert_seconds`` in older configs). A corpus that cannot give every
    code ``min_points_per_code`` points at every level is refused before any backbone runs.
    """

    max_seconds: float = 72_000.0  # audio read for fitting (CLAP windows come from all of it)
    semantic_seconds: float = 3600.0  # the part of it whose semantic frames (and Encodec latents) are extracted
    max_points: int = 200_000  # semantic frames (and Encodec latents) kept for k-means
    clap_hop_seconds: float = 1.0  # CLAP window hop while fitting: dense, many points per hour
    min_points_per_code: int = 50  # refuse to fit a codebook on fewer points than this per code
    heldout_fraction: float = 0.05  # fit files whose CLAP windows only measure the fit (reconstruction error)
    niter: int = 20
    seed: int = 0

    RENAMED: typing.ClassVar[dict[str, str]] = {"mert_seconds": "semantic_seconds"}


@dataclass(frozen=True)
class TokenizeConfig:
    audio: AudioConfig = field(default_factory=AudioConfig)
    clap: ClapConfig = field(default_factory=ClapConfig)
    semantic: SemanticConfig = field(default_factory=SemanticConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    fit: FitConfig = field(default_factory=FitConfig)
    shard_size: int = 256  # clips per shard, at least: a shard closes at the end of the batch that fills it
    batch_seconds: float = 240.0  # audio per planned batch: whole files, their segments through the backbones together
    precision: str = "fp32"  # backbone arithmetic: fp32, bf16 or fp16 (autocast); part of what tokens mean
    # the watchdog: a run where no batch has finished for this long (and for 5x the slowest batch so far) while
    # work is pending says what Ray reports as pending and stops, keeping its finished shards
    stall_seconds: float = 300.0

    # keys of configs and records written before the backbones were pluggable
    RENAMED: typing.ClassVar[dict[str, str]] = {"mert": "semantic", "encodec": "codec"}


@dataclass(frozen=True)
class ModelConfig:
    n_layers: int = 6
    d_model: int = 1024
    n_heads: int = 8
    mlp_hidden: int = 0  # 0: SwiGLU width 8/3 * d_model rounded up to a multiple of 64
    dropout: float = 0.0
    rope_base: float = 10000.0
    # rotary position of a token: "time" (its frame's time, shared by every stream; models.layout)
    # or "index" (its index in the flat sequence: runs recorded before positions were a setting)
    positions: str = "time"


POSITIONS = ("time", "index")


@dataclass(frozen=True)
class StageConfig:
    window_seconds: float = 10.0
    cond_dropout: float = 0.1  # probability that a sample's CLAP prefix is replaced by the learned null


@dataclass(frozen=True)
class StagesConfig:
    semantic: StageConfig = field(default_factory=lambda: StageConfig(10.0, 0.1))
    coarse: StageConfig = field(default_factory=lambda: StageConfig(4.0, 0.1))
    fine: StageConfig = field(default_factory=lambda: StageConfig(2.0, 0.0))

    def get(self, stage: str) -> StageConfig:
        if stage not in STAGES:
            raise UserError(f"unknown stage '{stage}': choose one of {', '.join(STAGES)}")
        return getattr(self, stage)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100_000
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 1000
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    eval_every: int = 1000
    eval_batches: int = 20
    save_every: int = 1000
    keep_last: int = 3
    log_every: int = 10
    val_fraction: float = 0.05  # shards held out when no --val-data is given
    num_workers: int = 2
    seed: int = 0
    compile: bool = False


@dataclass(frozen=True)
class GenerateConfig:
    temperature_semantic: float = 1.0
    temperature_coarse: float = 0.95
    temperature_fine: float = 0.4
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    cfg_scale: float = 3.0
    num_samples: int = 1
    keep: int = 1


@dataclass(frozen=True)
class Config:
    name: str = "custom"
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    stages: StagesConfig = field(default_factory=StagesConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def to_dict(obj: Any) -> dict[str, Any]:
    """A config dataclass as plain JSON-able data (tuples become lists)."""
    return dataclasses.asdict(obj)


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from nested dicts, refusing unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise UserError(f"config: '{where or 'top level'}' should be a table, got {type(data).__name__}")
    data = renamed(cls, data)
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"config: unknown key '{_join(where, unknown[0])}' (known: {', '.join(sorted(known))})")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, _join(where, name))
    return cls(**kwargs)


def renamed(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with the keys ``cls.RENAMED`` lists under their present names. An old key given beside
    its new one (a user's file over a preset) is merged over it, as the user's keys always are."""
    out = dict(data)
    for old, new in getattr(cls, "RENAMED", {}).items():
        if old in out:
            value = out.pop(old)
            out[new] = _merge(out[new], value) if isinstance(value, dict) and isinstance(out.get(new), dict) else value
    return out


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _coerce(hint: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise UserError(f"config: '{where}' should be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, where) for a, v in zip(args, value))
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is dict and isinstance(value, dict):
        return value
    if isinstance(hint, type) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise UserError(f"config: '{where}' should be {getattr(hint, '__name__', hint)}, got {value!r}")


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def preset_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))


def _read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"config path is a folder, not a TOML file: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"config file {path} is not valid TOML: {e}") from None


def _raw(preset: str | None, path: Path | None, seen: tuple = ()) -> dict:
    if path is not None:
        data = _read_toml(Path(path))
        base = data.pop("base", None)
        if base is not None:
            if base in seen:
                raise UserError(f"config file {path}: 'base' chain loops through '{base}'")
            return _merge(_raw(base, None, seen + (base,)), data)
        return data
    if preset not in preset_names():
        raise UserError(f"unknown preset '{preset}': choose one of {', '.join(preset_names())}, or pass --config FILE")
    return _raw(None, CONFIG_DIR / f"{preset}.toml", seen + (preset,))


def load_config(preset: str | None = None, path: str | Path | None = None) -> Config:
    """The config for ``--preset NAME`` or ``--config FILE`` (exactly one of them)."""
    if preset is not None and path is not None:
        raise UserError("give either --preset or --config, not both")
    if preset is None and path is None:
        preset = "small"
    data = _raw(preset, Path(path) if path is not None else None)
    data.setdefault("name", preset if path is None else Path(path).stem)
    cfg = from_dict(Config, data)
    check_config(cfg)
    return cfg


def config_from_dict(data: dict[str, Any]) -> Config:
    """Inverse of :meth:`Config.to_dict` (used to read a run's or a tokenizer's recorded config).

    A recorded config lacks the keys added after it was written; each is read with the value that
    behaves as the code that wrote it did (:func:`recorded_model`)."""
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        data = {**data, "model": recorded_model(data["model"])}
    return from_dict(Config, data)


def recorded_model(model: dict[str, Any]) -> dict[str, Any]:
    """A recorded ``[model]`` table with the keys added since filled as its run behaved: runs made
    before ``positions`` was a setting used sequence indices."""
    return {"positions": "index", **model}


def tokenize_config_from_dict(data: dict[str, Any]) -> TokenizeConfig:
    return from_dict(TokenizeConfig, data, "tokenize")


# ---- consistency checks ------------------------------------------------------------------------
def frame_grid(frame_rates: Sequence[float]) -> Fraction:
    """The shortest duration that is a whole number of frames at every rate of ``frame_rates``
    (1 / their greatest common divisor): 40 ms at 50 and 75 Hz."""
    rates = [Fraction(r).limit_denominator(10_000) for r in frame_rates]
    num = math.gcd(*(r.numerator for r in rates))
    den = math.lcm(*(r.denominator for r in rates))
    return 1 / Fraction(num, den)


def _on_grid(seconds: float, grid: Fraction) -> bool:
    ticks = Fraction(seconds).limit_denominator(1_000_000) / grid
    return ticks.denominator == 1 and ticks > 0


def clap_windows_per_segment(seconds: float, window: float, hop: float) -> int:
    """CLAP windows in one segment of ``seconds``: at least one (a short segment is repeat-padded)."""
    if seconds <= window:
        return 1
    return int(math.floor((seconds - window) / hop + 1e-9)) + 1


def fitted_clap_windows_per_second(t: TokenizeConfig) -> float:
    """CLAP windows the fit gets per second of audio in full segments, held-out files excluded."""
    seg = t.audio.segment_seconds
    per_segment = clap_windows_per_segment(seg, t.clap.window_seconds, t.fit.clap_hop_seconds)
    return per_segment / seg * (1 - t.fit.heldout_fraction)


def check_config(cfg: Config, frame_rates: Sequence[float] = ()) -> None:
    """Refuse, in one line each, a config whose parts cannot work together.

    - every stage window is positive and, given the backbones' ``frame_rates`` (known once they are:
      tokenizer.json's streams, or their configs), a whole number of frames at each of them
      (:func:`frame_grid`, 40 ms at 50 and 75 Hz); and it fits whole, with room to crop, in every
      segment: a file longer than ``segment_seconds`` is split into segments no shorter than half
      of it (audio.plan_segments), so a window must be at most half of it;
    - the fit budget can feed every vocabulary ``min_points_per_code`` points per code.

    Checks that need a backbone's own settings (the CLAP window of its feature extractor, the semantic model's
    layer count and frame rate) are in :mod:`musiclm.pipeline.fit_plan`.
    """
    t = cfg.tokenize
    seg = t.audio.segment_seconds
    if seg <= 0 or t.audio.min_seconds < 0:
        raise UserError(f"config '{cfg.name}': tokenize.audio.segment_seconds must be positive and min_seconds not negative")
    grid = frame_grid(frame_rates) if frame_rates else None
    for stage in STAGES:
        w = cfg.stages.get(stage).window_seconds
        if w <= 0:
            raise UserError(f"config '{cfg.name}': stages.{stage}.window_seconds must be positive")
        if grid is not None and not _on_grid(w, grid):
            rates = " and ".join(f"{float(r):g} Hz" for r in frame_rates)
            raise UserError(
                f"config '{cfg.name}': stages.{stage}.window_seconds = {w:g} is not a multiple of {float(grid):g} s "
                f"(the frame grid shared by the backbones' {rates})"
            )
        if w > seg / 2 + 1e-9:
            raise UserError(
                f"config '{cfg.name}': stages.{stage}.window_seconds = {w:g} does not fit whole in every segment: files are split into "
                f"segments no shorter than half of tokenize.audio.segment_seconds = {seg:g}; raise segment_seconds to at least {2 * w:g}"
            )
    if cfg.model.positions not in POSITIONS:
        raise UserError(f"config '{cfg.name}': model.positions = '{cfg.model.positions}' is not one of {', '.join(POSITIONS)}")
    if t.precision not in PRECISIONS:
        raise UserError(f"config '{cfg.name}': tokenize.precision = '{t.precision}' is not one of {', '.join(PRECISIONS)}")
    if t.batch_seconds <= 0:
        raise UserError(f"config '{cfg.name}': tokenize.batch_seconds must be positive")
    if t.stall_seconds <= 0:
        raise UserError(f"config '{cfg.name}': tokenize.stall_seconds must be positive")
    f = t.fit
    if f.min_points_per_code < 1 or f.clap_hop_seconds <= 0 or not 0 <= f.heldout_fraction < 0.5 or f.semantic_seconds > f.max_seconds:
        raise UserError(
            f"config '{cfg.name}': tokenize.fit needs min_points_per_code >= 1, clap_hop_seconds > 0, "
            "0 <= heldout_fraction < 0.5 and semantic_seconds <= max_seconds"
        )
    clap_need = t.clap.codebook_size * f.min_points_per_code
    rate = fitted_clap_windows_per_second(t)
    clap_budget = int(f.max_seconds * rate + 1e-6)
    if clap_budget < clap_need:
        raise UserError(
            f"config '{cfg.name}': tokenize.fit.max_seconds = {f.max_seconds:g} gives at most {clap_budget} CLAP windows to fit on, but "
            f"{t.clap.codebook_size} codes x {f.min_points_per_code} points need {clap_need}: raise max_seconds to at least "
            f"{math.ceil(clap_need / rate)}, or use a smaller tokenize.clap.codebook_size"
        )
    k = t.semantic.codebook_size
    if f.max_points < k * f.min_points_per_code:
        raise UserError(
            f"config '{cfg.name}': tokenize.fit.max_points = {f.max_points} cannot feed tokenize.semantic.codebook_size = {k} "
            f"({f.min_points_per_code} points per code need {k * f.min_points_per_code})"
        )
