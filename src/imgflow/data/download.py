"""Checksum-verified downloads into the cache, written atomically."""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path


from imgflow.errors import UserError
from imgflow.progress import interactive, progress_bar

log = logging.getLogger(__name__)

_CHUNK = 1 << 20  # bytes per read
_TIMEOUT = 60  # seconds without data before giving up


def download(url: str, dest: Path, md5: str, progress: bool = True, hint: str = "") -> Path:
    """Fetch `url` to `dest` and verify its md5; return `dest`.

    The file is streamed into a temp file beside `dest` and renamed into place only once the
    checksum matches, so an existing `dest` is always a verified copy and is reused as is.
    `hint` is appended to error messages (e.g. how to point at a local copy instead).
    """
    dest = Path(dest)
    if dest.is_file():
        return dest
    suffix = f" {hint}" if hint else ""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    h = hashlib.md5()
    log.info("downloading %s", url)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=_TIMEOUT) as response:
            total = response.headers.get("Content-Length")
            with progress_bar(enabled=progress and interactive(), total=int(total) if total else None, unit="B", unit_scale=True,
                              desc=dest.name, leave=False) as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
        if h.hexdigest() != md5:
            raise UserError(f"checksum mismatch for {url}: md5 {h.hexdigest()}, expected {md5}; "
                            f"the download is damaged, try again.{suffix}")
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(f"could not download {url}: {reason}.{suffix}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return dest
