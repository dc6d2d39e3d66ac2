"""Atomic artifact writes (temp file + rename) and JSON reading with clear errors."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, TypeVar

from imgflow.errors import MalformedContent, UserError

T = TypeVar("T")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp_path) on a temp file beside `path`, then rename it into place.

    A crash leaves either the old file or the new one, never a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        # mkstemp makes 0600, and some writers (safetensors) recreate the file: set the mode
        # after writing, as for any file this user creates, since artifacts are meant to be shared.
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    # A path whose bytes are not UTF-8 (a data folder's name, shown in a report) reaches here
    # as lone surrogates: write it as \udcNN rather than fail after the work is done.
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8", errors="backslashreplace"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: Path, what: str = "file") -> Any:
    """Read a JSON file; missing or corrupt files raise UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {what} {path}: {exc}") from None


def read_json_checked(path: Path, what: str, check: Callable[[Any], T], fix: str) -> T:
    """read_json, then check(content); content of the wrong shape is a UserError that names the
    file, the field and `fix` (what the user can do about it)."""
    content = read_json(path, what)
    try:
        return check(content)
    except MalformedContent as exc:
        raise UserError(f"{path} is not a valid imgflow {what}: {exc}; {fix}") from None


# ----------------------------------------------------------------------------------------------
# checking the shape of JSON content: each check returns the value or raises MalformedContent

_KINDS: dict[str, type | tuple[type, ...]] = {
    "an object": dict, "a list": list, "a string": str, "a number": (int, float), "an integer": int,
    "a boolean": bool}


def describe(value: Any) -> str:
    """How a JSON value reads in a message: 'a string ("x")', 'null', 'a list', ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({json.dumps(value)})"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return f"a string ({json.dumps(value[:40])})"
    return "a list" if isinstance(value, list) else "an object" if isinstance(value, dict) else type(value).__name__


def expect(value: Any, kind: str, name: str) -> Any:
    """`value` if it is `kind` ('an object', 'a list', 'a string', 'a number', 'an integer')."""
    # bool is an int to Python, never a number to a reader of the file
    if not isinstance(value, _KINDS[kind]) or (isinstance(value, bool) and kind != "a boolean"):
        raise MalformedContent(f"{name} is {describe(value)}, expected {kind}")
    return value


def field(obj: dict, key: str, kind: str, where: str = "") -> Any:
    """obj[key] checked by `expect`; `where` prefixes the name ('train.' -> 'train.epochs')."""
    if key not in obj:
        raise MalformedContent(f"'{where}{key}' is missing")
    return expect(obj[key], kind, f"'{where}{key}'")


def list_of(value: Any, kind: str, name: str, length: int | None = None) -> list:
    """A list whose items are all `kind` (and, if given, exactly `length` of them)."""
    expect(value, "a list", name)
    if length is not None and len(value) != length:
        raise MalformedContent(f"{name} has {len(value)} items, expected {length}")
    for item in value:
        expect(item, kind, f"an item of {name}")
    return value
