"""`imgflow serve`: a trained model behind HTTP, with a page to try it from a browser or a phone.

    settings.py  what the server is told (address, limits, batching)
    model.py     the model, loaded once as `imgflow predict` loads it; uploads read as predict reads files
    batching.py  requests that arrive together share one forward pass, off the event loop
    app.py       the routes (FastAPI), upload limits, bad input -> 4xx with a JSON message
    server.py    binding, the start-up lines, uvicorn
    page.html    the upload page: one self-contained file, no external assets

FastAPI, uvicorn and python-multipart are an optional extra (`pip install 'imgflow[serve]'`):
importing this package needs none of them; `serve` says how to install them when missing.
"""
from __future__ import annotations

import os

from imgflow.serving.settings import ServeSettings

__all__ = ["ServeSettings", "serve"]


def serve(model: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, *, top_k: int = 5,
          max_upload_mb: float = 20.0, max_files: int = 16, max_batch: int = 64,
          batch_wait_ms: float = 5.0, device: str = "auto") -> None:
    """Serve a run directory or an exported MODEL.onnx over HTTP until Ctrl-C (blocks).

    `host` 127.0.0.1 answers this machine only; "0.0.0.0" the whole network. See ServeSettings.
    """
    from imgflow.serving.server import run_server

    run_server(model, ServeSettings(host=host, port=port, top_k=top_k, max_upload_mb=max_upload_mb,
                                    max_files=max_files, max_batch=max_batch, batch_wait_ms=batch_wait_ms, device=device))
