"""Command line: parse, validate, call one library function, turn known errors into exit 2.

`parser.py` builds the options (`arguments.py` the shared pieces), `commands.py` runs them. No ML
logic lives here. Heavy modules (torch) are imported inside the command that needs them, so
`imgflow --help` and `imgflow inspect` start quickly.
"""
from __future__ import annotations

import errno
import logging
import os
import sys

# Idle OpenMP threads sleep instead of spinning: on a busy 2-core machine spinning made two
# threads 2-5x slower than one; on an idle one both policies measured the same
# (benchmarks/results). Set before torch is imported; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from imgflow.allocator import keep_freed_memory
from imgflow.cli.arguments import other_rank
from imgflow.cli.parser import build_parser
from imgflow.errors import UserError

log = logging.getLogger("imgflow")


def _configure_logging(verbosity: int) -> None:
    level = {-1: logging.WARNING, 0: logging.INFO}.get(max(-1, min(verbosity, 1)), logging.DEBUG)
    if verbosity <= -2:
        level = logging.ERROR
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)


# Commands whose work is not shared out among torchrun's processes: N copies would each do all of
# it and write the same files.
_ONE_PROCESS = {"inspect", "models", "evaluate", "report", "predict", "export", "reproduce-seed", "lr-find",
                "serve"}


def _escape_unencodable_output() -> None:
    """Print paths whose bytes are not UTF-8 (kept by Python as lone surrogates) as \\x escapes.

    stderr already does this; stdout would raise UnicodeEncodeError mid-output instead.
    """
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")


_PATH_ERRNOS = {errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EROFS, errno.EEXIST, errno.ENOTDIR,
                errno.EISDIR, errno.ENOENT, errno.EDQUOT, errno.ENAMETOOLONG, errno.ELOOP, errno.EIO}


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()  # before any tensor: large ones are then reused, not page-faulted each step
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet = other_rank()
    _configure_logging(-2 if quiet else args.verbose - args.quiet)
    _escape_unencodable_output()
    try:
        if args.command in _ONE_PROCESS and os.environ.get("WORLD_SIZE", "1") not in ("", "1"):
            raise UserError(f"'imgflow {args.command}' runs in one process: start it without torchrun "
                            "('imgflow train', 'workflow' and 'tune' are the commands that train with several)")
        return args.func(args)
    except UserError as exc:
        if not quiet:
            print(f"imgflow: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        detail = f": {exc}" if str(exc) else ""
        if not quiet:
            print(f"imgflow: interrupted{detail}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and closed early: not an error
        sys.stderr.close()
        return 0
    except OSError as exc:
        # The file system refused a path the user gave (an --out that is a file, no permission,
        # disk full): one line. Anything else is a bug and keeps its traceback.
        if exc.filename is None or exc.errno not in _PATH_ERRNOS:
            raise
        if exc.errno in (errno.EEXIST, errno.ENOTDIR):
            message = f"{exc.filename}: a file stands where a directory is needed (check --out and the paths given)"
        else:
            message = f"{exc.filename}: {exc.strerror} (check the path, and that you may write there)"
        print(f"imgflow: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
