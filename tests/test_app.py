"""``musiclm app``: the form's rules and the picture without a browser, then the page in headless
Chromium (Debian's /usr/bin/chromium driven by Playwright) against the tiny trained runs.

The browser tests share one server (in this process, so that every socket it opens is seen)
and record every request the browser makes: none may leave 127.0.0.1.

    MUSICLM_APP_SCREENSHOT=docs/app.png .venv/bin/python -m pytest -q tests/test_app.py -k plays

rewrites the README's picture of the page.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import soundfile as sf

from musiclm.app.page import wav_bytes
from musiclm.app.picture import render_picture
from musiclm.app.request import MAX_KEEP, MAX_SECONDS, StageProgress, build_request, page_message, parse_story
from musiclm.errors import UserError
from tests.conftest import ROOT
from tests.factories import torch_threads

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
LOCAL = {"127.0.0.1", "localhost", "::1"}
WAIT_MS = 60_000  # generous: the machine is shared


def form(prompt="a calm piano", seconds=10.0, num_samples=1.0, keep=1.0, cfg_scale="", temperature="", seed=0.0, every=""):
    """build_request with the values an untouched page sends, but for the ones given."""
    return build_request(prompt, seconds, num_samples, keep, cfg_scale, temperature, seed, every)


# ---- the form, without a browser -------------------------------------------------------------------------------------
def test_form_values_become_the_generate_arguments():
    req = form("  a calm piano  ", 4.5, 4.0, 2.0, "3", "0.9", 7.0)
    assert req.prompts == ["a calm piano"] and req.seconds == 4.5
    assert req.kwargs() == dict(num_samples=4, keep=2, cfg_scale=3.0, temperature=(0.9, 0.9, 0.9), seed=7, every=None)
    assert not req.streams  # several samples are re-ranked once whole
    assert form(num_samples=1.0).streams
    assert form(temperature="1, 0.9 0.5").temperature == (1.0, 0.9, 0.5)  # semantic, coarse, fine
    defaults = form()
    assert defaults.cfg_scale is None and defaults.temperature is None  # empty: each stage's own settings


def test_story_is_one_prompt_per_line_with_seconds_per_prompt():
    assert parse_story("calm piano\n\n  driving drums \nquiet ending\n", None) == (["calm piano", "driving drums", "quiet ending"], None)
    assert parse_story("a\nb", 0.0) == (["a", "b"], None)  # 0: equal shares, as generate without --every
    req = form("calm piano\ndriving drums\nquiet ending", 45.0, every="15")
    assert req.prompts == ["calm piano", "driving drums", "quiet ending"] and req.every == 15.0
    assert form("calm piano\ndriving drums", 45.0).every is None


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(prompt=" \n "), "the text prompt is empty"),
        (dict(seconds=0.0), "'Seconds' must be a positive number"),
        (dict(seconds=None), "'Seconds' is empty"),
        (dict(seconds=MAX_SECONDS + 1), f"'Seconds' must be at most {MAX_SECONDS:g}"),
        (dict(num_samples=2.0, keep=3.0), "'Samples kept' 3 is more than 'Samples generated' 2"),
        (dict(num_samples=2.5), "'Samples generated' must be a whole number"),
        (dict(keep=float(MAX_KEEP + 1), num_samples=8.0), f"'Samples kept' must be a whole number from 1 to {MAX_KEEP}"),
        (dict(seed=-1.0), "'Seed' must be a whole number"),
        (dict(cfg_scale="strong"), "'Guidance' must be a number, or empty"),
        (dict(cfg_scale="-1"), "'Guidance' must be >= 0"),
        (dict(temperature="1 2"), "'Temperature' takes 1 value (all stages) or 3"),
        (dict(temperature="-0.5"), "temperatures must be >= 0"),
        (dict(every="5"), "'Seconds per prompt' switches between several prompts"),
        (dict(prompt="a\nb", every="-2"), "'Seconds per prompt' must be a positive number"),
        (dict(prompt="a\nb\nc", seconds=10.0, every="5"), "prompt 3 would start at 10 s, past the end of the 10 s asked"),
    ],
)
def test_bad_form_values_are_one_line_messages_that_name_the_field(values, message):
    with pytest.raises(UserError) as e:
        form(**values)
    assert message in page_message(e.value) and "\n" not in page_message(e.value)


def test_page_message_names_an_upload_by_its_name_not_its_temporary_path():
    e = UserError("cannot read the prompt audio /tmp/gradio/0123abcd/song.wav: cannot decode")
    assert page_message(e, {"/tmp/gradio/0123abcd/song.wav": "song.wav"}) == "cannot read the prompt audio song.wav: cannot decode"


def test_progress_of_interleaved_stages_is_their_mean():
    seen = []
    progress = StageProgress(("semantic", "coarse", "fine"), lambda fraction, text: seen.append((fraction, text)))
    progress("semantic", 10.0, 10.0)
    progress("coarse", 2.0, 10.0)
    assert seen[-1] == (pytest.approx((1 + 0.2) / 3), "semantic 10.0/10.0 s, coarse 2.0/10.0 s")
    progress("coarse", 10.0, 10.0)
    progress("fine", 10.0, 10.0)
    assert seen[-1][0] == pytest.approx(1.0)


def test_picture_shows_the_waveform_over_the_spectrogram(tmp_path):
    from PIL import Image

    sr = 24000
    t = np.arange(2 * sr) / sr
    tone = render_picture((0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), sr, tmp_path / "tone.png")
    silence = render_picture(np.zeros(2 * sr, np.float32), sr, tmp_path / "silence.png")
    short = render_picture(np.full(100, 0.1, np.float32), sr, tmp_path / "short.png")  # shorter than one FFT
    for path in (tone, silence, short):
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size == (512, 256)
    assert tone.read_bytes() != silence.read_bytes()


def test_streamed_chunks_are_16_bit_wav_at_their_own_level():
    chunk = np.array([0.0, 0.25, -0.5, 2.0], np.float32)  # 2.0 is clipped, the rest keep their level
    audio, sr = sf.read(io.BytesIO(wav_bytes(chunk, 24000)), dtype="float32")
    assert sr == 24000 and sf.info(io.BytesIO(wav_bytes(chunk, 24000))).subtype == "PCM_16"
    assert np.allclose(audio, [0.0, 0.25, -0.5, 1.0], atol=1 / 32768)


# ---- the command -----------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_app_without_gradio_says_in_one_line_how_to_install_it(tmp_path):
    """A gradio that fails to import (as a missing one does) stands in front of the real one."""
    (tmp_path / "gradio").mkdir()
    (tmp_path / "gradio" / "__init__.py").write_text("raise ImportError('No module named gradio')\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    proc = subprocess.run([sys.executable, "-m", "musiclm", "app", "--model", str(tmp_path / "runs")], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: musiclm app needs gradio: pip install 'musiclm[app]'"


@pytest.mark.slow
def test_app_command_loads_the_model_and_listens_on_127_0_0_1_only(trained_runs):
    import psutil

    port = _free_port()
    cmd = [sys.executable, "-m", "musiclm", "app", "--model", str(trained_runs), "--port", str(port), "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        line = proc.stdout.readline()  # the server is up once it is printed
        assert line.startswith(f"musiclm app: http://127.0.0.1:{port}/"), (line, proc.poll())
        listening = {c.laddr for c in psutil.Process(proc.pid).net_connections("inet") if c.status == psutil.CONN_LISTEN}
        assert listening == {("127.0.0.1", port)}
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_a_port_in_use_is_refused_in_one_line_and_0_picks_a_free_one():
    from musiclm.app import _free

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=f"cannot serve on 127.0.0.1:{port} .*pass another --port"):
            _free("127.0.0.1", port)
    assert _free("127.0.0.1", 0) > 0


def test_app_refuses_a_model_folder_without_runs_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "musiclm", "app", "--model", str(tmp_path)], capture_output=True, text=True, timeout=120, check=False, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: no semantic stage") and proc.stderr.count("\n") == 1


@pytest.mark.parametrize("limit", [0.0, -1.0, float("nan")])
def test_an_upload_limit_that_is_not_a_positive_number_is_refused_before_the_model_loads(tmp_path, limit):
    from musiclm.app import run_app

    with pytest.raises(UserError, match="--max-upload-mb must be a positive number"):
        run_app(tmp_path / "no-model-here", max_upload_mb=limit)


# ---- the page, in a browser ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def connections():
    """Every address this process's sockets connect to while the server runs."""
    seen: list = []
    original = socket.socket.connect, socket.socket.connect_ex

    def connect(self, address):
        seen.append(address)
        return original[0](self, address)

    def connect_ex(self, address):
        seen.append(address)
        return original[1](self, address)

    socket.socket.connect, socket.socket.connect_ex = connect, connect_ex
    yield seen
    socket.socket.connect, socket.socket.connect_ex = original


@pytest.fixture(scope="module")
def server(trained_runs, connections, tmp_path_factory):
    """The page of the tiny runs on a free port of 127.0.0.1, uploads limited to 1 MB: its URL."""
    from musiclm.app import serve
    from musiclm.generation.model import MusicLM

    if shutil.which("ffmpeg") is None:
        pytest.fail("the page streams one sample through gradio, which encodes with ffmpeg: `make install` as root, or apt-get install -y ffmpeg")
    with torch_threads(1):  # tiny models sample faster on one thread on a busy 2-core machine
        lm = MusicLM.from_pretrained(trained_runs, device="cpu")
        demo, url = serve(lm, host="127.0.0.1", port=0, max_upload_mb=1.0, workdir=tmp_path_factory.mktemp("app"))  # 0: a free port
        yield url
        demo.close()


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"the page is tested in Debian's Chromium and {CHROMIUM} is missing: `make install` as root, or apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)  # a fresh profile each launch
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def requests() -> list[str]:
    """Every URL the browser asked for, over all the tests of this module."""
    return []


@pytest.fixture
def page(browser, server, requests):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.on("request", lambda r: requests.append(r.url))
    page.set_default_timeout(WAIT_MS)
    page.goto(server)
    yield page
    context.close()


def fill(page, **fields) -> None:
    """Type into the page's fields by their element id (prompt, seconds, every, num-samples, keep, ...)."""
    for name, value in fields.items():
        page.locator(f"#{name.replace('_', '-')}").locator("textarea, input").first.fill(str(value))


# The players' <audio> elements live in shadow roots, which document.querySelectorAll does not enter.
AUDIO_DURATIONS = """root => {
    const found = [];
    const walk = r => { r.querySelectorAll('audio').forEach(a => found.push(a.duration)); r.querySelectorAll('*').forEach(e => e.shadowRoot && walk(e.shadowRoot)); };
    walk(root);
    return found.filter(d => isFinite(d));
}"""


def wait_for_audio(page, selector: str, condition: str) -> None:
    """Wait until an <audio> element under ``selector`` has a duration ``d`` for which the JS
    expression ``condition`` holds."""
    page.wait_for_function(f"() => [...document.querySelectorAll('{selector}')].some(el => ({AUDIO_DURATIONS})(el).some(d => {condition}))", polling=100)


def durations(page, selector: str) -> list[float]:
    return page.eval_on_selector_all(selector, "els => els.map(a => a.duration).filter(d => isFinite(d))")


def press_generate(page) -> None:
    """Click Generate until the page sends the request: a click is ignored while the page still
    holds an earlier run, which a cancelled run is for a moment after Cancel."""
    from playwright.sync_api import TimeoutError

    for _ in range(30):
        try:
            with page.expect_request(lambda r: "/queue/join" in r.url, timeout=2000):
                page.locator("#generate").click()
            return
        except TimeoutError:
            continue
    raise AssertionError("the page sent no request for Generate")


def generate(page, seconds: float, **fields) -> None:
    """Fill the form, press Generate and wait until the first result plays ``seconds`` of audio."""
    fill(page, seconds=seconds, **fields)
    press_generate(page)
    wait_for_audio(page, "#audio-0", f"Math.abs(d - {seconds}) < 1e-3")


def downloads(page) -> dict[str, bytes]:
    links = page.eval_on_selector_all("#download a[download]", "els => els.map(a => [a.download, a.href])")
    return {name: page.request.get(href).body() for name, href in links}


@pytest.mark.slow
def test_page_plays_the_seconds_asked_as_made_and_as_a_file_with_score_picture_and_download(page, tmp_path):
    fill(page, prompt="a calm piano over soft rain")
    generate(page, 2.4, seed=3)  # the page's default is 10 s
    assert durations(page, "#audio-0 audio") == [pytest.approx(2.4, abs=1e-3)]
    # the streamed copy is AAC: whole frames of 1024 samples, plus one for the encoder's priming
    wait_for_audio(page, "#live", "d > 2.3")
    assert [d for d in durations(page, "#live audio") if d > 0] == [pytest.approx(2.4 + 1024 / 24000, abs=1024 / 24000)]
    assert re.fullmatch(r"CLAP score -?\d\.\d{3}", page.locator("#score-0").inner_text().strip())
    assert page.locator("#picture-0 img").evaluate("img => img.complete && img.naturalWidth") == 512
    assert page.locator("#sample-1").is_hidden()
    files = downloads(page)
    assert set(files) == {"musiclm-seed3-0.wav", "musiclm-seed3.json"}
    audio, sr = sf.read(io.BytesIO(files["musiclm-seed3-0.wav"]))
    assert len(audio) == round(2.4 * sr)
    record = json.loads(files["musiclm-seed3.json"])
    assert record["prompts"] == ["a calm piano over soft rain"] and record["seed"] == 3
    assert f"{record['clap_scores'][0]:.3f}" in page.locator("#score-0").inner_text()
    page.screenshot(path=os.environ.get("MUSICLM_APP_SCREENSHOT") or tmp_path / "app.png", full_page=True)


@pytest.mark.slow
def test_page_keeps_the_best_samples_of_a_story(page):
    fill(page, prompt="calm piano\ndriving drums", every="0.6", num_samples="3", keep="2")  # equal shares would be 0.8
    generate(page, 1.6)
    scores = [float(page.locator(f"#score-{i}").inner_text().split()[2]) for i in range(2)]
    assert scores[0] >= scores[1]
    assert page.locator("#sample-1").is_visible() and page.locator("#sample-2").is_hidden()
    assert durations(page, "#audio-1 audio") == [pytest.approx(1.6, abs=1e-3)]
    record = json.loads(downloads(page)["musiclm-seed0.json"])
    assert record["prompts"] == ["calm piano", "driving drums"] and record["every"] == 0.6
    assert sorted(record["clap_scores"], reverse=True)[:2] == pytest.approx(scores, abs=1e-3)


@pytest.mark.slow
def test_page_continues_an_uploaded_prompt_audio(page, tmp_path):
    sr = 24000
    t = np.arange(3 * sr) / sr
    sf.write(tmp_path / "intro.wav", (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), sr)
    page.locator("#prompt-audio input[type=file]").set_input_files(str(tmp_path / "intro.wav"))
    page.locator("#prompt-audio").get_by_text("intro.wav").wait_for()
    generate(page, 1.2, prompt="a calm piano")
    record = json.loads(downloads(page)["musiclm-seed0.json"])
    assert record["prompt_audio"]["file"] == "intro.wav"
    assert 2.0 < record["prompt_audio"]["continues_at"] <= 3.0  # the new music follows the end of the file


@pytest.mark.slow
def test_bad_input_is_a_message_on_the_page(page, tmp_path):
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"RIFF" + bytes(range(256)) * 8)
    big = tmp_path / "big.wav"
    big.write_bytes(b"RIFF" + bytes(2 * 1024 * 1024))  # the test server takes 1 MB
    upload = page.locator("#prompt-audio input[type=file]")
    cases = [
        (dict(prompt=""), None, "the text prompt is empty"),
        (dict(prompt="a calm piano", seconds="-1"), None, "'Seconds' must be a positive number, got -1"),
        (dict(seconds="2", every="5"), None, "'Seconds per prompt' switches between several prompts"),
        (dict(prompt="calm piano\ndrums\nquiet", seconds="10", every="5"), None, "prompt 3 would start at 10 s"),
        (dict(prompt="a calm piano", every="", num_samples="2", keep="3"), None, "'Samples kept' 3 is more than 'Samples generated' 2"),
        (dict(keep="1"), big, "exceed the maximum allowed size"),
        (dict(), garbage, "cannot read the prompt audio garbage.wav"),
    ]
    for fields, file, message in cases:
        fill(page, **fields)
        if file is not None:
            upload.set_input_files(str(file))
        if file is not big:  # too big is refused as it is uploaded
            page.locator("#generate").click()
        toast = page.get_by_test_id("toast-text").filter(has_text=message)
        toast.wait_for()
        assert "Traceback" not in toast.inner_text()
        page.get_by_test_id("toast-close").first.click()
        page.get_by_test_id("toast-body").wait_for(state="detached")
    assert page.locator("#sample-0").is_hidden()  # nothing was generated


@pytest.mark.slow
def test_cancel_stops_the_running_request_at_its_next_window(page, monkeypatch):
    """A run of the page's longest output is cancelled once it has made audio; the next request
    then runs at once. Counting the fine windows sampled shows the cancelled run stopped."""
    from musiclm.config import load_config
    from musiclm.generation import run

    windows = []

    def counted(stage, *args, **kw):
        windows.append(stage.layout.stage)
        return sample(stage, *args, **kw)

    sample = run.sample_window
    monkeypatch.setattr(run, "sample_window", counted)
    fill(page, prompt="a calm piano", seconds=MAX_SECONDS)
    press_generate(page)
    page.locator("#status .progress-level").filter(has_text=re.compile(r"fine \d")).first.wait_for(state="attached")  # the progress bar
    wait_for_audio(page, "#live", "d > 0")  # audio is playing
    page.locator("#cancel").click()
    page.locator("#status").filter(has_text="cancelled").wait_for()
    generate(page, 1.2)
    whole_run = MAX_SECONDS / load_config("tiny").stages.fine.window_seconds  # fine windows, at least
    assert 0 < windows.count("fine") < whole_run / 4
    assert page.locator("#sample-0").is_visible() and durations(page, "#audio-0 audio") == [pytest.approx(1.2, abs=1e-3)]


@pytest.mark.slow
def test_nothing_is_fetched_from_any_host_but_this_one(page, requests, connections):
    generate(page, 1.0, prompt="a calm piano")
    hosts = {urlparse(url).hostname for url in requests if not url.startswith(("data:", "blob:"))}
    assert hosts == {"127.0.0.1"}, hosts
    remote = [a for a in connections if isinstance(a, tuple) and a[0] not in LOCAL]
    assert connections and not remote, remote
