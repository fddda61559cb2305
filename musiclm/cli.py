"""The ``musiclm`` command: parses options and calls the library. No logic lives here.

Bad input raises :class:`~musiclm.errors.UserError` somewhere below; :func:`main`
prints it on one line and exits with code 2.

Layer: top.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from musiclm.errors import Stopped, UserError

try:  # typer >= 0.29 vendors its own click
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - older typer uses the click package
    from click import exceptions as click_exceptions

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Train and run MusicLM-style text-to-music models from cached integer tokens.",
)

PresetOpt = typer.Option(None, "--preset", help="Preset name (tiny, small, large).")
ConfigOpt = typer.Option(None, "--config", help="TOML config file (may start with base = \"PRESET\").")


def _config(preset: Optional[str], config: Optional[Path], default: str = "small"):
    from musiclm.config import load_config

    if preset is None and config is None:
        preset = default
    return load_config(preset, config)


@app.command()
def tokenize(
    corpus: Path = typer.Argument(..., help="Folder of audio files (searched recursively)."),
    out: Path = typer.Option(..., "--out", help="Output folder: tokenizer/, shards/, stats/, errors/."),
    preset: Optional[str] = PresetOpt,
    config: Optional[Path] = ConfigOpt,
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Reuse this tokenizer folder (DIR/tokenizer) instead of fitting one."),
    address: Optional[str] = typer.Option(None, "--address", help="Join this Ray cluster (default: start a local one)."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Backbone actors (default: 1 per GPU, else 1)."),
    gpus_per_worker: float = typer.Option(-1.0, "--gpus-per-worker", help="GPUs per actor (default: 1 when GPUs exist, else 0)."),
    shard_size: Optional[int] = typer.Option(None, "--shard-size", min=1, help="Clips per shard (default from the config)."),
    batch_seconds: Optional[float] = typer.Option(
        None, "--batch-seconds", min=1.0, help="Audio per backbone batch, whole files (default from the config; kept for a resumed run)."
    ),
    manifest_paths: str = typer.Option(
        "names", "--manifest-paths", help="How the corpus manifest names files: names (relative paths) or hashed (sha256 of each path, for private corpora)."
    ),
    verify: bool = typer.Option(
        False, "--verify", help="Before resuming, hash every file of --out against its record (finds damage that left sizes and times alone) and repair what differs."
    ),
) -> None:
    """Turn a folder of music into integer-token shards, once."""
    from musiclm.pipeline.tokenize_job import run_tokenize

    cfg = None if (tokenizer is not None and preset is None and config is None) else _config(preset, config)
    run_tokenize(
        corpus,
        out,
        cfg,
        tokenizer_dir=tokenizer,
        address=address,
        workers=workers,
        gpus_per_worker=None if gpus_per_worker < 0 else gpus_per_worker,
        shard_size=shard_size,
        batch_seconds=batch_seconds,
        manifest_paths=manifest_paths,
        verify=verify,
    )


@app.command()
def stats(
    data: Path = typer.Argument(..., help="A tokenized folder (the --out of musiclm tokenize)."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write codebook usage and durations to this PNG."),
) -> None:
    """Show what the tokens look like (reads only the Parquet statistics)."""
    from musiclm.commands.stats import run_stats

    run_stats(data, as_json=json_out, plot=plot)


@app.command()
def train(
    stage: str = typer.Argument(..., help="semantic, coarse or fine."),
    data: Path = typer.Option(..., "--data", help="A tokenized folder."),
    out: Path = typer.Option(..., "--out", help="Run folder: checkpoints, metrics, config."),
    preset: Optional[str] = PresetOpt,
    config: Optional[Path] = ConfigOpt,
    steps: Optional[int] = typer.Option(None, "--steps", min=1),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum", min=1),
    lr: Optional[float] = typer.Option(None, "--lr"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    val_data: Optional[Path] = typer.Option(None, "--val-data", help="Validation folder tokenized with the same tokenizer."),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", min=1),
    save_every: Optional[int] = typer.Option(None, "--save-every", min=1),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="Data loader processes."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in --out."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:N (default: cuda if available)."),
    init_from: Optional[Path] = typer.Option(
        None, "--init-from", help="Fine-tune: start from this run's weights (a run or checkpoint folder of the same stage and tokenizer), fresh optimizer, step 0."
    ),
    lora_rank: Optional[int] = typer.Option(None, "--lora-rank", min=1, help="With --init-from: train a LoRA adapter of this rank; the base stays frozen, checkpoints hold the adapter."),
    lora_alpha: Optional[float] = typer.Option(None, "--lora-alpha", help="LoRA scale numerator: the update is alpha/rank * B A (default: alpha = rank)."),
) -> None:
    """Train one stage from cached tokens (no backbone is loaded)."""
    from musiclm.training.trainer import run_train

    run_train(
        stage,
        data,
        out,
        None if preset is None and config is None else _config(preset, config),
        steps=steps,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=lr,
        seed=seed,
        val_data=val_data,
        eval_every=eval_every,
        save_every=save_every,
        num_workers=workers,
        resume=resume,
        compile=compile,
        device=device,
        init_from=init_from,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
    )


@app.command()
def merge(
    adapter_run: Path = typer.Argument(..., help="An adapter run (musiclm train --lora-rank) or one of its checkpoints."),
    out: Path = typer.Option(..., "--out", help="The full stage run folder to write."),
) -> None:
    """Fold a LoRA adapter into its base: a stage run folder that no longer needs the base."""
    from musiclm.training.merge import merge_run

    merge_run(adapter_run, out)


@app.command()
def generate(
    prompts: Optional[list[str]] = typer.Argument(None, help="Text prompt; several prompts with --every make a story."),
    model: Optional[Path] = typer.Option(None, "--model", help="Folder holding semantic/, coarse/, fine/ runs."),
    semantic: Optional[Path] = typer.Option(None, "--semantic", help="Semantic run folder (overrides --model)."),
    coarse: Optional[Path] = typer.Option(None, "--coarse", help="Coarse run folder (overrides --model)."),
    fine: Optional[Path] = typer.Option(None, "--fine", help="Fine run folder (overrides --model)."),
    seconds: float = typer.Option(10.0, "--seconds", help="Seconds of new audio (a --prompt-audio is not included)."),
    out: Path = typer.Option(Path("out.wav"), "--out", help="Audio file (FILE-0, FILE-1 ... with --keep > 1); settings go to FILE.json. '-': a WAV stream on stdout."),
    num_samples: Optional[int] = typer.Option(None, "--num-samples", min=1, help="Samples generated as one batch (default from the config)."),
    keep: Optional[int] = typer.Option(None, "--keep", min=1, help="Keep the best by CLAP text-audio score (default from the config)."),
    cfg_scale: Optional[float] = typer.Option(None, "--cfg-scale"),
    temperature: Optional[list[float]] = typer.Option(None, "--temperature", help="Per stage: give 1 or 3 values (semantic, coarse, fine)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", min=0),
    top_p: Optional[float] = typer.Option(None, "--top-p"),
    seed: int = typer.Option(0, "--seed"),
    prompt_audio: Optional[Path] = typer.Option(None, "--prompt-audio", help="Continue this audio."),
    style_audio: Optional[Path] = typer.Option(None, "--style-audio", help="Instead of text: music like this file (its CLAP audio tokens)."),
    every: Optional[float] = typer.Option(None, "--every", help="Seconds per prompt when several prompts are given."),
    coarse_only: bool = typer.Option(False, "--coarse-only", help="Skip the fine stage."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Recompute the whole sequence per token (slow; for checks)."),
    fmt: Optional[str] = typer.Option(None, "--format", help="wav or flac (default: the suffix of --out, else wav)."),
    device: Optional[str] = typer.Option(None, "--device"),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32, bf16 or int8 (default: bf16 on a GPU, int8 on a CPU)."),
    stream: bool = typer.Option(False, "--stream", help="Write audio as it is made (one sample; with --out - for a player on a pipe)."),
    revision: Optional[str] = typer.Option(None, "--revision", help="With --model OWNER/NAME: the hub branch, tag or commit to pull."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow a pulled tokenizer to run code from the hub."),
    audit: Optional[Path] = typer.Option(None, "--audit", help="Then audit what was written against this tokenized corpus (see musiclm audit)."),
) -> None:
    """Generate music from text with three trained stages."""
    from musiclm.commands.generate import Output, run_generate
    from musiclm.generation.request import SamplingRequest

    request = SamplingRequest(
        prompts or None,
        seconds,
        num_samples=num_samples,
        keep=keep,
        cfg_scale=cfg_scale,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        prompt_audio=prompt_audio,
        style_audio=style_audio,
        every=every,
        coarse_only=coarse_only,
        use_cache=not no_cache,
    )
    output = Output(out, fmt, stream=stream, audit=audit)
    run_generate(
        request,
        output,
        model=model,
        semantic=semantic,
        coarse=coarse,
        fine=fine,
        device=device,
        precision=precision,
        revision=revision,
        trust_remote_code=trust_remote_code,
    )


@app.command()
def push(
    model: Path = typer.Argument(..., help="Folder holding semantic/, coarse/ and fine/ runs (and optionally tokenizer/)."),
    repo_id: str = typer.Argument(..., help="Hub repository, OWNER/NAME."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch to commit to (default main)."),
    token: Optional[str] = typer.Option(None, "--token", help="Hub token (default: the one huggingface_hub finds)."),
    private: bool = typer.Option(False, "--private", help="Create the repository private."),
    endpoint: Optional[str] = typer.Option(None, "--endpoint", help="Hub endpoint (default huggingface.co)."),
) -> None:
    """Upload three trained stages (weights only), their tokenizer and a model card to the hub."""
    from musiclm.hub.push import push as push_model

    sha = push_model(model, repo_id, revision=revision, token=token, private=private, endpoint=endpoint)
    print(f"pushed {repo_id} at {sha}: pull exactly this with --model {repo_id} --revision {sha}")


@app.command()
def audit(
    generated: list[Path] = typer.Argument(..., help="Generated audio files to check against the training corpus."),
    data: Path = typer.Option(..., "--data", help="The tokenized training corpus (the --out of musiclm tokenize)."),
    top: int = typer.Option(5, "--top", min=1, help="Nearest training clips reported per file."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON (a boolean 'flagged' per file)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:N (default: cuda if available)."),
) -> None:
    """Memorization audit: the training clips nearest each generated file, with source, offset, score and verdict.

    Exit code 0 when no file is flagged, 1 when one is (like grep), 2 on bad input."""
    from musiclm.commands.audit import run_audit

    flagged = run_audit(generated, data, top=top, as_json=json_out, device=device)
    raise typer.Exit(1 if any(flagged) else 0)


@app.command()
def verify(
    folder: Path = typer.Argument(..., help="A tokenized folder, a run folder, or a folder of semantic/, coarse/, fine/ runs."),
    json_out: bool = typer.Option(False, "--json", help="Print the findings as JSON."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Files hashed in parallel (default: CPU count)."),
) -> None:
    """Check every file against its recorded checksum; exit 0 only when nothing is damaged, missing or unexpected."""
    from musiclm.commands.verify import run_verify

    ok = run_verify(folder, as_json=json_out, workers=workers)
    raise typer.Exit(0 if ok else 1)


@app.command("app")
def web_app(
    model: str = typer.Option(..., "--model", help="Folder holding semantic/, coarse/, fine/ runs, or a hub repo id."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (default: this machine only)."),
    port: int = typer.Option(7860, "--port", min=0, max=65535),
    device: Optional[str] = typer.Option(None, "--device"),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32, bf16 or int8 (default: bf16 on a GPU, int8 on a CPU)."),
    revision: Optional[str] = typer.Option(None, "--revision", help="With --model OWNER/NAME: the hub branch, tag or commit to pull."),
    max_upload_mb: float = typer.Option(20.0, "--max-upload-mb", help="Largest prompt-audio upload accepted."),
) -> None:
    """A local web page to make music: prompt in, audio players, scores and pictures out."""
    from musiclm.app import run_app

    run_app(model, host=host, port=port, device=device, precision=precision, revision=revision, max_upload_mb=max_upload_mb)


@app.command("eval")
def evaluate(
    generated: Path = typer.Option(..., "--generated", help="Folder of generated audio."),
    reference: Path = typer.Option(..., "--reference", help="Folder of reference audio."),
    tokenizer: Path = typer.Option(..., "--tokenizer", help="Tokenizer folder whose CLAP (or semantic model) embeds the audio."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Text file, one prompt per generated file (sorted by name), for the CLAP score."),
    embedding: str = typer.Option("clap", "--embedding", help="clap or semantic (the semantic model's layer features; mert is read as semantic)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the result as JSON here."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N (auto: cuda if available)."),
    batch_windows: Optional[int] = typer.Option(None, "--batch-windows", min=1, help="Audio windows per backbone call (default 64; lower it if the GPU runs out of memory)."),
) -> None:
    """Fréchet Audio Distance and CLAP text-audio score."""
    from musiclm.metrics import run_eval

    run_eval(generated, reference, tokenizer=tokenizer, prompts=prompts, embedding=embedding, out=out, device=device, batch_windows=batch_windows)


def main(argv: list[str] | None = None) -> None:
    command = typer.main.get_command(app)
    try:
        # without standalone mode, click returns the code of a typer.Exit (audit, verify) instead of exiting
        code = command.main(args=argv, prog_name="musiclm", standalone_mode=False)
    except Stopped as e:  # SIGINT or SIGTERM, after the command cleaned up
        print(e, file=sys.stderr)
        sys.exit(e.exit_code)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except click_exceptions.NoArgsIsHelpError:
        sys.exit(2)  # `musiclm` alone: typer has printed the help
    except click_exceptions.UsageError as e:
        hint = f" (see: {e.ctx.command_path} --help)" if e.ctx is not None else ""
        print(f"error: {e.format_message()}{hint}", file=sys.stderr)
        sys.exit(2)
    except typer.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    if isinstance(code, int) and code:
        sys.exit(code)
