"""Running an `imgflow` command from a benchmark script so that Ctrl-C stops it cleanly."""
from __future__ import annotations

import signal
import subprocess


def run_to_end(command: list[str]) -> None:
    """subprocess.run(command, check=True), except that Ctrl-C lets the command save and stop.

    The child runs in its own process group, and each Ctrl-C the benchmark gets is passed on
    to it: `imgflow train` then saves a checkpoint and exits (a second Ctrl-C aborts it), and
    the benchmark stops after it. subprocess.run would kill the child a quarter of a second
    after the first Ctrl-C instead, losing the work since its last checkpoint.
    """
    interrupted = False
    with subprocess.Popen(command, process_group=0) as child:
        while True:
            try:
                returncode = child.wait()
                break
            except KeyboardInterrupt:
                interrupted = True
                child.send_signal(signal.SIGINT)
    if interrupted:
        raise KeyboardInterrupt
    if returncode:
        raise subprocess.CalledProcessError(returncode, command)
