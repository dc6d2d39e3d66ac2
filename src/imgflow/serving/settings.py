"""What `imgflow serve` is told: address, answer size, input limits and batching, in one place."""
from __future__ import annotations

from dataclasses import dataclass

from imgflow.errors import UserError
from imgflow.prediction import DEFAULT_TOP_K


@dataclass(frozen=True)
class ServeSettings:
    host: str = "127.0.0.1"  # loopback: reachable from this machine only, until the user says otherwise
    port: int = 8000  # 0 = any free port (logged at start)
    top_k: int = DEFAULT_TOP_K  # classes per image, unless a request asks ?top_k=K
    max_upload_mb: float = 20.0  # largest request body, MiB: larger ones get 413 before they are read
    max_files: int = 16  # images per request; a phone's photo picker sends a handful
    max_batch: int = 64  # images per forward pass, at most
    # How long the first request of a batch waits for others, ms. Under load requests queue
    # while the model runs and batch anyway; this adds the ones that arrive at the same moment.
    batch_wait_ms: float = 5.0
    device: str = "auto"  # where a run's model runs (an .onnx file runs on onnxruntime's CPU provider)

    def __post_init__(self):
        checks = {"top_k": self.top_k >= 1, "max_files": self.max_files >= 1,
                  "max_batch": self.max_batch >= 1, "max_upload_mb": self.max_upload_mb > 0,
                  "batch_wait_ms": 0 <= self.batch_wait_ms <= 1000, "port": 0 <= self.port <= 65535}
        bad = [f"{name}={getattr(self, name)!r}" for name, ok in checks.items() if not ok]
        if bad:
            raise UserError(f"bad serve settings: {', '.join(bad)} (sizes and counts must be positive, "
                            "batch_wait_ms 0-1000, port 0-65535)")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)
