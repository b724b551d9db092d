"""The web UI (``cyclediffusion serve``; ``pip install 'cyclediffusion[ui]'``): generate, edit and translate in a
browser. :class:`Studio` is the part without the web (checked input, the model card); :func:`serve` starts the
Gradio app of :mod:`cyclediffusion.ui.app` on it."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Any

from .limits import InputError, Limits
from .studio import Generated, Studio


def serve(
    model: str | Path,
    target_model: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 7860,
    limits: Limits | None = None,
    device: str = "auto",
    dtype: str = "auto",
    block: bool = True,
) -> Any:
    """Load the model(s), start the page on ``host:port`` (loopback by default) and print its address.

    The models load before the server starts, so a bad folder fails at once. With ``block`` (the CLI) this returns
    when the server is stopped (Ctrl-C); otherwise it returns the running app (``app.close()`` stops it)."""
    studio = Studio(model, target_model, device=device, dtype=dtype, limits=limits)
    from .app import build_app, launch  # gradio: the ui extra

    app = build_app(studio)
    address = launch(app, studio.limits, host, port)
    if not block:
        print(f"cyclediffusion: serving {studio.model_dir} at {address}", flush=True)
        return app
    try:  # from before the address is printed, so that a Ctrl-C right after it is a clean stop too
        print(f"cyclediffusion: serving {studio.model_dir} at {address} (Ctrl-C stops)", flush=True)
        app.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        _stop(app)
    return app


def _stop(app: Any, grace_s: float = 10.0) -> None:
    """Close ``app``, waiting at most ``grace_s`` seconds for it: a server that does not stop in time is left to
    the process's end (the CLI then calls :func:`exit_soon`)."""
    closer = threading.Thread(target=app.close, daemon=True)
    closer.start()
    closer.join(grace_s)


def exit_soon(grace_s: float = 10.0) -> None:
    """For the CLI after the server stopped: if the interpreter is still waiting on a worker thread ``grace_s``
    seconds from now, end the process anyway, so that a stopped server never lingers holding its port."""

    def exit_now() -> None:
        print("cyclediffusion: a worker thread did not stop; exiting", file=sys.stderr, flush=True)
        os._exit(0)

    watchdog = threading.Timer(grace_s, exit_now)
    watchdog.daemon = True  # it dies with a process that exits in time
    watchdog.start()


__all__ = ["Generated", "InputError", "Limits", "Studio", "exit_soon", "serve"]
