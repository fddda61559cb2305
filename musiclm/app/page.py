"""The page itself: gradio components, the generate event and its cancel button.

One :class:`Page` holds the loaded model. A request is a generator: it checks the form
(:mod:`musiclm.app.request`), then steps a :class:`~musiclm.generation.run.GenerationRun`
window by window, yielding between steps, so that the progress bar moves, one sample
plays as it is made (gradio's streamed audio, which needs ffmpeg) and a cancel stops the
run at the next window. Each step holds a lock: a cancelled run's last window finishes
before the next request touches the model.

Layer: app (imports the generation layer).
"""

from __future__ import annotations

import html
import io
import json
import shutil
import threading
from collections.abc import Iterator
from itertools import count
from dataclasses import replace
from pathlib import Path

import numpy as np

from musiclm.app.picture import render_picture
from musiclm.app.request import MAX_KEEP, MAX_SECONDS, Request, StageProgress, build_request, page_message
from musiclm.errors import UserError
from musiclm.generation.model import MusicLM
from musiclm.generation.request import check_prompt_audio
from musiclm.generation.run import Generation, GenerationRun
from musiclm.version import __version__

INTRO = """## musiclm
Describe the music; one prompt per line makes a story, each line playing for *Seconds per prompt*.
Empty *Guidance* and *Temperature* use each stage's own settings."""


def wav_bytes(chunk: np.ndarray, sample_rate: int) -> bytes:
    """A chunk (float32 [samples]) as 16-bit WAV bytes: what gradio's streamed audio takes without
    re-scaling (a numpy chunk would be normalised to its own peak, so each chunk to another level)."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.clip(chunk, -1.0, 1.0), sample_rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


class Page:
    """The page of one loaded model; ``workdir`` receives each request's files (WAV, PNG, JSON)."""

    def __init__(self, lm: MusicLM, workdir: str | Path, *, max_upload_mb: float, live: bool | None = None):
        self.lm, self.workdir, self.max_upload_mb = lm, Path(workdir), max_upload_mb
        self.live = shutil.which("ffmpeg") is not None if live is None else live  # gradio encodes streamed audio with ffmpeg
        self.coarse_only = "fine" not in lm.stages
        self.lock = threading.Lock()
        self.requests = count()

    def build(self, gr):
        """The page as a ``gr.Blocks`` (not yet launched).

        Long for a reason: gradio builds a page as nested ``with`` blocks in the order it shows, and the
        generate event is a closure over the components it updates; split, the layout would no longer
        read as the page looks."""
        defaults = self.lm.stages["semantic"].cfg.generate
        stage_cfg = " ".join(f"{st.cfg.generate.cfg_scale:g}" for st in self.lm.stages.values())
        stage_temp = " ".join(f"{getattr(st.cfg.generate, 'temperature_' + name):g}" for name, st in self.lm.stages.items())
        with gr.Blocks(title="musiclm", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
            gr.Markdown(INTRO + ("" if self.live else "\nInstall ffmpeg to hear one sample as it is made."))
            with gr.Row():
                with gr.Column():
                    prompt = gr.Textbox(label="Prompt", lines=3, placeholder="a calm piano over soft rain", elem_id="prompt")
                    with gr.Row():
                        seconds = gr.Number(10, label="Seconds", info=f"up to {MAX_SECONDS:g}", elem_id="seconds")
                        every = gr.Textbox(label="Seconds per prompt", info="story mode; empty: equal shares", elem_id="every")
                    with gr.Row():
                        num_samples = gr.Number(defaults.num_samples, precision=0, label="Samples generated", info="one plays as it is made", elem_id="num-samples")
                        keep = gr.Number(defaults.keep, precision=0, label="Samples kept", info=f"best by CLAP score, up to {MAX_KEEP}", elem_id="keep")
                    with gr.Row():
                        cfg_scale = gr.Textbox(label="Guidance", placeholder=stage_cfg, info="empty: each stage's own", elem_id="guidance")
                        temperature = gr.Textbox(label="Temperature", placeholder=stage_temp, info="one, or semantic coarse fine", elem_id="temperature")
                        seed = gr.Number(0, precision=0, label="Seed", elem_id="seed")
                    prompt_audio = gr.File(label=f"Prompt audio to continue (optional, up to {self.max_upload_mb:g} MB)", elem_id="prompt-audio")
                    with gr.Row():
                        go = gr.Button("Generate", variant="primary", elem_id="generate")
                        stop = gr.Button("Cancel", variant="stop", elem_id="cancel")
                with gr.Column():
                    live = gr.Audio(label="As it is made", streaming=True, autoplay=True, interactive=False, visible=self.live, elem_id="live")
                    status = gr.Markdown(min_height=80, container=True, elem_id="status")  # where the progress bar shows
                    slots = []
                    for i in range(MAX_KEEP):
                        with gr.Column(visible=False, elem_id=f"sample-{i}") as column:
                            audio = gr.Audio(type="filepath", label=f"Sample {i + 1}", interactive=False, buttons=["download"], elem_id=f"audio-{i}")
                            score = gr.Markdown(elem_id=f"score-{i}")
                            picture = gr.Image(type="filepath", format="png", interactive=False, show_label=False, buttons=[], elem_id=f"picture-{i}")
                        slots.append((column, audio, score, picture))
                    files = gr.File(label="Download", file_count="multiple", interactive=False, elem_id="download")

            def generate(prompt_, seconds_, num_samples_, keep_, cfg_scale_, temperature_, seed_, every_, prompt_audio_, progress=gr.Progress()):  # noqa: B008 (gradio's way to ask for a bar)
                names = {prompt_audio_: Path(prompt_audio_).name} if prompt_audio_ else {}
                try:
                    req = build_request(prompt_, seconds_, num_samples_, keep_, cfg_scale_, temperature_, seed_, every_)
                    if prompt_audio_:
                        check_prompt_audio(prompt_audio_)
                except UserError as e:
                    raise gr.Error(html.escape(page_message(e, names)), print_exception=False) from None
                stream = self.live and req.streams
                empty = {column: gr.Column(visible=False) for column, *_ in slots}
                yield {**empty, files: None, status: "generating…", **({live: None} if self.live else {})}
                try:
                    run = self.start(req, prompt_audio_, stream, progress)
                    chunks = iter(run)
                    while (chunk := self.step(chunks)) is not None:
                        yield {live: wav_bytes(chunk, self.lm.sample_rate)} if stream else {status: gr.skip()}  # also where a cancel stops the run
                except UserError as e:  # e.g. a prompt audio too short to continue, known once it is read
                    raise gr.Error(html.escape(page_message(e, names)), print_exception=False) from None
                g = run.generation
                written = self.write(req, g, prompt_audio_)
                update = {status: self.summary(g), files: [str(p) for p in written["files"]]}
                for rank, (column, audio, score, picture) in enumerate(slots):
                    if rank < len(g.kept):
                        i = g.kept[rank]
                        update[column] = gr.Column(visible=True)
                        update[audio] = gr.Audio(value=str(written["audio"][rank]), label=f"Sample {i + 1} of {len(g.scores)}")
                        update[score] = f"CLAP score **{g.scores[i]:.3f}**" + (" (the best)" if rank == 0 and len(g.scores) > 1 else "")
                        update[picture] = str(written["pictures"][rank])
                yield update

            inputs = [prompt, seconds, num_samples, keep, cfg_scale, temperature, seed, every, prompt_audio]
            outputs = [status, files, *(c for slot in slots for c in slot), *([live] if self.live else [])]
            event = go.click(generate, inputs=inputs, outputs=outputs, concurrency_limit=1, show_progress_on=[status], api_visibility="private")
            stop.click(lambda: "cancelled", outputs=[status], cancels=[event], queue=False, api_visibility="private")
        return demo

    def start(self, req: Request, prompt_audio: str | None, stream: bool, progress) -> GenerationRun:
        """The run for ``req`` (streamed: one sample, its chunks yielded as made), reporting to
        gradio's progress bar ``progress(fraction, desc=...)``."""
        stages = ("semantic", "coarse") if self.coarse_only else ("semantic", "coarse", "fine")
        report = StageProgress(stages, lambda fraction, text: progress(fraction, desc=text))
        request = req.sampling(prompt_audio=prompt_audio, coarse_only=self.coarse_only)
        if stream:
            request = replace(request, num_samples=1, keep=1)  # one sample
        return self.lm.run(request, progress=report, stream=stream)

    def step(self, chunks: Iterator[np.ndarray]) -> np.ndarray | None:
        """The run's next audio chunk, None at its end. The lock is held for one step only: a generator
        that gradio stops pulling (cancelled) is left between steps, never holding it."""
        with self.lock:
            return next(chunks, None)

    def write(self, req: Request, g: Generation, prompt_audio: str | None) -> dict[str, list[Path]]:
        """The kept samples as WAV files with their pictures, and the request's settings and scores
        as JSON, in a new folder under ``workdir``."""
        from musiclm.pipeline.audio_out import write_audio

        out = self.workdir / f"request-{next(self.requests):04d}"
        out.mkdir(parents=True)
        stem = f"musiclm-seed{req.seed}"
        audio, pictures = [], []
        for rank, samples in enumerate(g.audio):
            audio.append(out / f"{stem}-{rank}.wav")
            write_audio(audio[-1], samples, g.sample_rate, "wav")
            pictures.append(render_picture(samples, g.sample_rate, out / f"{stem}-{rank}.png"))
        record = {
            "musiclm": __version__,
            "prompts": g.prompts,
            "every": g.every,
            "seconds": req.seconds,
            "seed": req.seed,
            "sample_rate": g.sample_rate,
            "files": [{"file": p.name, "sample": i, "clap_score": float(g.scores[i])} for p, i in zip(audio, g.kept)],
            "clap_scores": [float(s) for s in g.scores],
            "stages": {name: vars(s) for name, s in g.settings.items()},
            "prompt_audio": None if prompt_audio is None else {"file": Path(prompt_audio).name, "continues_at": g.continues_at},
            "timings": g.timings,
        }
        sidecar = out / f"{stem}.json"
        sidecar.write_text(json.dumps(record, indent=2) + "\n")
        return {"audio": audio, "pictures": pictures, "files": [*audio, sidecar]}

    @staticmethod
    def summary(g: Generation) -> str:
        """One line about a finished generation: length, samples, time taken."""
        seconds = g.audio.shape[1] / g.sample_rate
        work = sum(v for k, v in g.timings.items() if k != "first_audio")
        kept = f"kept {len(g.kept)} of {len(g.scores)} by CLAP score" if len(g.scores) > 1 else "one sample"
        return f"{seconds:.2f} s at {g.sample_rate} Hz, {kept}; made in {work:.1f} s (real-time factor {work / seconds:.2f})"
