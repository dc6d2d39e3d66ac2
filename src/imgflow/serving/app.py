"""The HTTP side of `imgflow serve`: routes, upload limits, and bad input turned into a 4xx.

    POST /predict   images as multipart uploads (any field name) or one image as the raw body;
                    answers {"predictions": [{"image", "top": [{"class", "probability"}]}]}, each
                    entry as `imgflow predict --json` writes it (an unreadable one among readable
                    ones gets "top": [] and an "error", as there)
    GET  /model     classes, input size, test accuracy, source, format, limits
    GET  /health    {"status": "ok"} and how many batches and images the model has run
    GET  /          the upload page (page.html: one file, no external assets)

A request is read with its size counted as it streams in, so an oversized upload is refused
(413) without being stored; decoding runs in Starlette's thread pool and the forward pass in the
batcher's thread, so the event loop only moves bytes. Every refusal is {"detail": "..."}.
"""
from __future__ import annotations

import contextlib
import tempfile
from importlib import resources
from pathlib import Path
from typing import AsyncIterator

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from imgflow.serving.batching import MicroBatcher
from imgflow.serving.model import ServedModel, decode_upload, top_classes, upload_error
from imgflow.serving.settings import ServeSettings
from imgflow.text import plural

Upload = tuple[str, bytes]  # (name shown in the answer, content)


def create_app(served: ServedModel, settings: ServeSettings = ServeSettings()) -> FastAPI:
    """The ASGI app serving `served`; its batcher and scratch directory live as long as the app runs."""
    batcher = MicroBatcher(served.model.probabilities, settings.max_batch, settings.batch_wait_ms / 1000)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        with tempfile.TemporaryDirectory(prefix="imgflow-serve-") as scratch:
            app.state.scratch = Path(scratch)
            await batcher.start()
            try:
                yield
            finally:
                await batcher.stop()

    # No /docs: FastAPI's docs page loads its scripts from a CDN, and this server works offline.
    app = FastAPI(title="imgflow serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.batcher = batcher
    page = resources.files("imgflow.serving").joinpath("page.html").read_text(encoding="utf-8")
    limits = {"max_upload_mb": settings.max_upload_mb, "max_files": settings.max_files,
              "top_k": settings.top_k}

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "batches": batcher.calls, "images": batcher.images}

    @app.get("/model")
    async def model_info() -> dict:
        return {**served.info, "limits": limits}

    @app.post("/predict")
    async def predict(request: Request, top_k: int | None = None) -> dict:
        k = settings.top_k if top_k is None else top_k
        if k < 1:
            raise HTTPException(400, f"top_k must be >= 1, got {k}")
        uploads = await read_uploads(request, settings)
        return {"predictions": await classify(uploads, served, batcher, app.state.scratch, k)}

    return app


async def classify(uploads: list[Upload], served: ServedModel, batcher: MicroBatcher, scratch: Path,
                   top_k: int) -> list[dict]:
    """Rows as predict writes them; 422 when no upload is a usable image."""
    arrays, rows = await run_in_threadpool(_decode_all, uploads, served, scratch)
    readable = [row for row in rows if "error" not in row]
    if not readable:
        shown = "; ".join(f"{row['image']}: {row['error']}" for row in rows[:3])
        more = f"; and {len(rows) - 3} more" if len(rows) > 3 else ""
        raise HTTPException(422, f"no image could be read from {plural(len(rows), 'upload')} ({shown}{more})")
    probs = await batcher.submit(np.stack(arrays))
    for row, top in zip(readable, top_classes(probs, served.classes, top_k)):
        row["top"] = top
    return rows


def _decode_all(uploads: list[Upload], served: ServedModel, scratch: Path) -> tuple[list, list[dict]]:
    arrays, rows = [], []
    for name, data in uploads:
        row = {"image": name, "top": []}
        try:
            arrays.append(decode_upload(data, served.model.spec, scratch))
        # Pillow's format plugins raise many exception types on hostile or broken files: any of
        # them means this upload is unusable, never that the server should stop.
        except Exception as exc:  # noqa: BLE001
            row["error"] = upload_error(exc)
        rows.append(row)
    return arrays, rows


# ----------------------------------------------------------------------------------------------
# reading a request


async def read_uploads(request: Request, settings: ServeSettings) -> list[Upload]:
    """(name, bytes) of each uploaded file, or of the raw body; 413 when too large, 400 when empty,
    malformed or holding more than --max-files files."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > settings.max_upload_bytes:
        raise _too_large(settings)
    body = _limited(request, settings)
    if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        uploads = await _multipart(request, body, settings)
    else:
        data = b"".join([chunk async for chunk in body])
        uploads = [(request.headers.get("x-filename") or "upload", data)] if data else []
    if not uploads:
        raise HTTPException(400, "empty request: send images as multipart files (field 'files'), "
                                 "or one image as the request body")
    return uploads


async def _limited(request: Request, settings: ServeSettings) -> AsyncIterator[bytes]:
    """The body's chunks; 413 as soon as they add up to more than the limit (a body without a
    Content-Length, or one that lies, is counted too)."""
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > settings.max_upload_bytes:
            raise _too_large(settings)
        yield chunk


def _too_large(settings: ServeSettings) -> HTTPException:
    return HTTPException(413, f"upload too large: at most {settings.max_upload_mb:g} MB per request "
                              "(imgflow serve --max-upload-mb)")


async def _multipart(request: Request, body: AsyncIterator[bytes], settings: ServeSettings) -> list[Upload]:
    # Starlette counts files as it parses, so a flood of tiny parts stops at the limit.
    parser = MultiPartParser(request.headers, body, max_files=settings.max_files, max_fields=100)
    try:
        form = await parser.parse()
    except MultiPartException as exc:  # too many files, or not multipart after all
        raise HTTPException(400, f"bad multipart upload: {exc.message} (this server takes at most "
                                 f"{plural(settings.max_files, 'file')} per request: imgflow serve "
                                 "--max-files)") from None
    try:
        return [(item.filename or field, await item.read())
                for field, item in form.multi_items() if isinstance(item, UploadFile)]
    finally:
        await form.close()
