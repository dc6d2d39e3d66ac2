"""List and read the files of a directory, .zip, .tar or .tar.gz, without extracting anything.

Archive members are read into memory one by one; nothing is ever written to disk, so a member
named `../../etc/passwd` or `/etc/passwd` cannot land outside anything. Such members are refused
all the same (listed as skipped), and so are links inside tar archives. Hidden entries (a path
part starting with '.'), `__MACOSX` resource forks and OS thumbnails are ignored entirely.
"""
from __future__ import annotations

import contextlib
import errno
import io
import mmap
import os
import re
import stat
import struct
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from imgflow.errors import UserError

IGNORED_NAMES = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini"})
# A member this large is no image anyone trains on; refusing it stops a zip bomb from being
# inflated in memory (Pillow's pixel limit only applies once the bytes are read).
MAX_MEMBER_BYTES = 512 * 1024 * 1024
_DRIVE = re.compile(r"^[A-Za-z]:")


# These two run once per archive member (60,000 times for CIFAR-10): plain loops and substring
# tests first, the general split only when a '..' is present at all.
def is_ignored(parts: tuple[str, ...]) -> bool:
    for p in parts:
        if p[:1] == "." or p in IGNORED_NAMES:
            return True
    return False


def unsafe_reason(name: str) -> str | None:
    """Why an archive member name is refused (absolute, drive letter, '..'), or None if safe."""
    if name[:1] in ("/", "\\") or (name[1:2] == ":" and _DRIVE.match(name)):
        return "absolute path in archive: refused"
    if ".." in name and ".." in re.split(r"[\\/]", name):
        return "'..' in archive path: refused"
    return None


def printable(name: str) -> str:
    """`name` with bytes that are not UTF-8 shown as \\xNN escapes.

    os.walk and tarfile keep such bytes as lone surrogates, which no UTF-8 output (terminal, JSON
    file, HTML report) can encode: names that become class names and skipped paths must be text.
    """
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def unusable_file_reason(path: Path) -> str | None:
    """Why a directory entry cannot be read as a file (None if it can), without opening it.

    Opening a named pipe blocks forever and a symlink loop or a dangling link fails only when
    read: those are skipped and listed instead, like undecodable images.
    """
    try:
        st = os.stat(path)  # follows symbolic links
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop: not followed"
        if os.path.islink(path):
            return "broken symbolic link (its target does not exist)"
        return f"cannot read: {exc.strerror}"
    if not stat.S_ISREG(st.st_mode):
        return f"not a regular file ({_file_kind(st.st_mode)})"
    if not os.access(path, os.R_OK):
        return "cannot read: permission denied"
    return None


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "special file"


@dataclass
class Listing:
    """What a source holds: files as (relative posix path, handle), directories, refusals."""

    files: list[tuple[str, Any]] = field(default_factory=list)
    dirs: set[str] = field(default_factory=set)
    refused: list[dict] = field(default_factory=list)  # {"path", "reason"}


class DirReader:
    kind = "directory"

    def __init__(self, root: Path):
        self.root = Path(root)

    def __enter__(self) -> "DirReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def list(self) -> Listing:
        listing = Listing()

        def unreadable_folder(exc: OSError) -> None:  # os.walk would skip it silently
            rel = Path(exc.filename).relative_to(self.root).as_posix()
            listing.refused.append({"path": printable(rel), "reason": f"cannot read folder: {exc.strerror}"})

        for dirpath, dirnames, filenames in os.walk(self.root, onerror=unreadable_folder):
            # Prune hidden folders in place so os.walk never descends into them.
            dirnames[:] = sorted(d for d in dirnames if not is_ignored((d,)))
            rel_dir = printable(Path(dirpath).relative_to(self.root).as_posix())
            prefix = "" if rel_dir == "." else rel_dir + "/"
            for d in dirnames:
                listing.dirs.add(prefix + printable(d))
            for name in sorted(filenames):
                if is_ignored((name,)):
                    continue
                path = Path(dirpath) / name
                reason = unusable_file_reason(path)
                if reason:
                    listing.refused.append({"path": prefix + printable(name), "reason": reason})
                else:
                    listing.files.append((prefix + printable(name), path))
        return listing

    def read(self, handles: list[Any]) -> Iterator[tuple[int, bytes | Exception]]:
        for i, path in enumerate(handles):
            try:
                yield i, path.read_bytes()
            except OSError as exc:
                yield i, exc


class ZipReader:
    kind = "zip archive"

    def __init__(self, path: Path):
        try:
            self.zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise UserError(f"cannot read zip archive {path}: {exc}") from None

    def __enter__(self) -> "ZipReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.zip.close()

    def list(self) -> Listing:
        listing = Listing()
        for info in self.zip.infolist():
            name = info.filename
            reason = unsafe_reason(name)
            parts = tuple(p for p in name.replace("\\", "/").split("/") if p)
            if reason:  # before the hidden-file test: '..' starts with a dot too
                listing.refused.append({"path": name, "reason": reason})
            elif not parts or is_ignored(parts):
                continue
            elif info.is_dir():
                listing.dirs.add("/".join(parts))
            elif info.file_size > MAX_MEMBER_BYTES:
                listing.refused.append({"path": name, "reason": f"{info.file_size} bytes: too large for an image"})
            else:
                listing.files.append(("/".join(parts), info))
        return listing

    def read(self, handles: list[Any]) -> Iterator[tuple[int, bytes | Exception]]:
        # ZipFile.read costs ~45 us a member (a new ZipExtFile each time): 2.7 s of the budget
        # for the 60,000 stored JPEGs of the CIFAR-10 zip. Stored (uncompressed) members are
        # sliced from a memory map instead, CRC-checked as zipfile would; others use zipfile.
        with self._mapped() as mapped:
            for i in sorted(range(len(handles)), key=lambda i: handles[i].header_offset):
                info = handles[i]
                try:
                    data = _stored_member(mapped, info) if mapped is not None else None
                    yield i, data if data is not None else self.zip.read(info)
                except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError,
                        RuntimeError) as exc:
                    yield i, exc  # bad CRC, unsupported compression, encrypted member, ...

    @contextlib.contextmanager
    def _mapped(self) -> Iterator[mmap.mmap | None]:
        try:
            mapped = mmap.mmap(self.zip.fp.fileno(), 0, access=mmap.ACCESS_READ)
        except (AttributeError, OSError, ValueError):  # not a real file, or an empty one
            yield None
            return
        try:
            yield mapped
        finally:
            mapped.close()


_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, 22 bytes we don't need, name and extra lengths


def _stored_member(mapped: mmap.mmap, info: zipfile.ZipInfo) -> bytes | None:
    """A stored, unencrypted member's bytes straight from the map; None to let zipfile do it."""
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
        return None
    offset = info.header_offset
    if offset + _LOCAL_HEADER.size > len(mapped):
        raise zipfile.BadZipFile(f"member {info.filename!r} lies outside the archive")
    signature, name_len, extra_len = _LOCAL_HEADER.unpack_from(mapped, offset)
    if signature != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"bad local header for member {info.filename!r}")
    start = offset + _LOCAL_HEADER.size + name_len + extra_len
    end = start + info.compress_size
    if end > len(mapped):
        raise zipfile.BadZipFile(f"member {info.filename!r} is truncated")
    data = mapped[start:end]
    if zlib.crc32(data) != info.CRC:
        raise zipfile.BadZipFile(f"bad CRC-32 for member {info.filename!r}")
    return data


class TarReader:
    kind = "tar archive"

    def __init__(self, path: Path):
        try:
            self.tar = tarfile.open(path, "r:*")
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise UserError(f"cannot read tar archive {path}: {exc}") from None
        self.path = path

    def __enter__(self) -> "TarReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.tar.close()

    def list(self) -> Listing:
        listing = Listing()
        try:
            members = self.tar.getmembers()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise UserError(f"cannot read tar archive {self.path}: {exc}") from None
        self._check_not_truncated()
        for m in members:
            name = printable(m.name)  # tarfile keeps non-UTF-8 bytes as surrogates
            reason = unsafe_reason(name)
            parts = tuple(p for p in name.split("/") if p and p != ".")
            if reason:  # before the hidden-file test: '..' starts with a dot too
                listing.refused.append({"path": name, "reason": reason})
            elif not parts or is_ignored(parts):
                continue
            elif m.isdir():
                listing.dirs.add("/".join(parts))
            elif m.issym() or m.islnk():
                listing.refused.append({"path": name, "reason": "link in archive: not followed"})
            elif not m.isfile():
                listing.refused.append({"path": name, "reason": "not a regular file"})
            elif m.size > MAX_MEMBER_BYTES:
                listing.refused.append({"path": name, "reason": f"{m.size} bytes: too large for an image"})
            else:
                listing.files.append(("/".join(parts), m))
        return listing

    def _check_not_truncated(self) -> None:
        """Refuse a plain .tar cut short between two members. tarfile then lists the members
        before the cut and stops without a word (a cut inside a member's data, it does report),
        so a whole split (test/, say) could silently vanish. A cut compressed archive fails to
        decompress instead, and is refused where it is read."""
        raw = self.tar.fileobj
        if not isinstance(raw, io.BufferedReader):  # a gzip, bz2 or xz stream
            return
        raw.seek(self.tar.offset)  # where the header after the last member would start
        if raw.read(512) != bytes(512):  # a zero block: the end-of-archive marker
            raise UserError(f"{self.path} is a truncated or corrupt tar archive (no end-of-archive "
                            "marker after its last member): copy or download it again")

    def read(self, handles: list[Any]) -> Iterator[tuple[int, bytes | Exception]]:
        # Increasing offsets only: a .tar.gz then decompresses once more, never from the start
        # again for every member.
        for i in sorted(range(len(handles)), key=lambda i: handles[i].offset_data):
            try:
                f = self.tar.extractfile(handles[i])
                assert f is not None, "regular members always have data"
                yield i, f.read()
            except (tarfile.TarError, OSError, EOFError) as exc:
                yield i, exc


def is_tar_archive(path: Path) -> bool:
    """Whether `path` is a tar archive (any compression); UserError when it is a damaged one."""
    try:
        return tarfile.is_tarfile(path)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:  # e.g. a truncated .tar.gz
        raise UserError(f"cannot read archive {path}: {exc} (is it truncated or corrupt?)") from None


def open_reader(path: Path) -> DirReader | ZipReader | TarReader:
    """A reader for a directory, zip or tar(.gz/.bz2/.xz) archive; UserError for anything else."""
    path = Path(path)
    if path.is_dir():
        return DirReader(path)
    if zipfile.is_zipfile(path):
        return ZipReader(path)
    if is_tar_archive(path):
        return TarReader(path)
    if path.suffix.lower() in (".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz"):
        raise UserError(f"cannot read archive {path}: not a valid {path.suffix} file (truncated or corrupt?)")
    raise UserError(f"{path} is not a directory, .zip or .tar(.gz) archive of images")
