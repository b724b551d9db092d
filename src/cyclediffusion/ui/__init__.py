"""The web UI (``cyclediffusion serve``; ``pip install 'cyclediffusion[ui]'``): generate, edit and translate in a
browser. :class:`Studio` is the part without the web (checked input, the model card); :func:`serve` starts the
Gradio app of :mod:`cyclediffusion.ui.app` on it."""

from __future__ import annotations

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
    print(f"cyclediffusion: serving {studio.model_dir} at {address} (Ctrl-C stops)", flush=True)
    if not block:
        return app
    try:
        app.block_thread()
    finally:
        app.close()
    return app


__all__ = ["Generated", "InputError", "Limits", "Studio", "serve"]
