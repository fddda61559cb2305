"""``musiclm app``: a web page, served on this machine with gradio, to make music with a trained model.

    musiclm app --model runs            # then open http://127.0.0.1:7860

The model is loaded once, before the server starts. Requests wait in a queue and run one
at a time (concurrency 1); a cancel button stops the running one. The page reaches no host
but the one serving it: gradio's analytics are off (``GRADIO_ANALYTICS_ENABLED`` is set
before gradio is imported), the theme uses the system's fonts (no web fonts), there is no
share link, and the server binds to 127.0.0.1 unless ``--host`` says otherwise. Uploads
larger than ``--max-upload-mb`` are refused by gradio before they reach the model.

gradio is an optional dependency (``pip install 'musiclm[app]'``), imported only here.

- :mod:`musiclm.app.request`: the form's values as a checked generation request (no gradio).
- :mod:`musiclm.app.picture`: a sample's waveform and spectrogram as a PNG.
- :mod:`musiclm.app.page`: the gradio page and its generate and cancel events.

Layer: app (imports the generation layer and ``models.precision``; imported only by the command line).
"""

from __future__ import annotations

import ipaddress
import math
import os
import socket
import tempfile
from pathlib import Path

from musiclm.errors import UserError

INSTALL_HINT = "musiclm app needs gradio: pip install 'musiclm[app]'"


def import_gradio():
    """gradio, imported with its analytics off; a :class:`UserError` saying how to install it if missing."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read when gradio is imported
    try:
        import gradio
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return gradio


def system_theme(gr):
    """gradio's base theme with the system's fonts only: nothing for the browser to fetch."""
    return gr.themes.Base(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def serve(lm, *, host: str = "127.0.0.1", port: int = 7860, max_upload_mb: float = 20.0, workdir: str | Path | None = None):
    """Start the page for a loaded :class:`~musiclm.generation.model.MusicLM` without blocking
    (``port`` 0: a free one); returns ``(demo, url)``. ``demo.close()`` stops it. Files the page writes go under ``workdir``
    (default: a new temporary folder)."""
    from musiclm.app.page import Page

    _check_upload_limit(max_upload_mb)
    gr = import_gradio()
    port = _free(host, port)
    workdir = Path(workdir or tempfile.mkdtemp(prefix="musiclm-app-"))
    demo = Page(lm, workdir, max_upload_mb=max_upload_mb).build(gr)
    demo.queue(default_concurrency_limit=1)
    try:
        _, url, _ = demo.launch(
            server_name=host,
            server_port=port,
            share=False,
            max_file_size=int(max_upload_mb * 1024 * 1024),
            allowed_paths=[str(workdir)],
            theme=system_theme(gr),
            footer_links=[],
            ssr_mode=False,
            mcp_server=False,
            pwa=False,
            enable_monitoring=False,
            run_history=False,
            show_error=False,
            inbrowser=False,
            quiet=True,
            prevent_thread_lock=True,
        )
    except OSError as e:  # taken between the check and the launch
        raise UserError(f"cannot serve on {host}:{port} ({e}): pass another --port") from None
    return demo, url


def _check_upload_limit(max_upload_mb: float) -> None:
    if not (math.isfinite(max_upload_mb) and max_upload_mb > 0):
        raise UserError(f"--max-upload-mb must be a positive number, got {max_upload_mb:g}")


def _free(host: str, port: int) -> int:
    """``port`` if it can be bound on ``host`` (0: a free port the system picks), else a :class:`UserError`."""
    try:
        with socket.create_server((host, port)) as s:
            return s.getsockname()[1]
    except OSError as e:
        raise UserError(f"cannot serve on {host}:{port} ({e.strerror or e}): pass another --port (0 picks a free one) or --host") from None


def run_app(
    model: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    device: str | None = None,
    precision: str | None = None,
    revision: str | None = None,
    max_upload_mb: float = 20.0,
) -> None:
    """``musiclm app``: load ``model`` (a folder of semantic/, coarse/, fine/ runs, or a hub id pulled at
    ``revision``) once, serve the page on ``host:port`` and block until Ctrl-C."""
    from musiclm.generation.model import MusicLM
    from musiclm.models.precision import check_precision

    import_gradio()  # before loading anything: a missing extra is the first thing to say
    _check_upload_limit(max_upload_mb)
    if precision is not None:
        check_precision(precision)
    lm = MusicLM.from_pretrained(model, device=device, precision=precision, revision=revision)
    demo, url = serve(lm, host=host, port=port, max_upload_mb=max_upload_mb)
    print(f"musiclm app: {url} ({lm.precision} on {lm.device}; Ctrl-C stops)", flush=True)
    if not _loopback(host):
        print(f"serving on {host}: anyone who reaches this machine on port {port} can use the page", flush=True)
    demo.block_thread()


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
