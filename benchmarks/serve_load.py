"""Load test of `imgflow serve`: requests/s and latency percentiles for 1 and 16 concurrent clients.

The question it answers: does micro-batching bring a served model's throughput under load close
to `imgflow predict`'s batched rate, and at what latency? It starts `imgflow serve SOURCE` itself,
on 127.0.0.1 only (a free port), and for each client count sends POST /predict with one image per
request from that many threads (keep-alive connections) until --requests requests are done or
--seconds have passed, whichever comes first. Before the server starts it times `predict` on the
same image, --predict-images copies in one call, as the rate to compare with. The server's own
/health counters give the mean batch size. Client and server share the machine's cores: on 2
cores the figures are a floor.

    python benchmarks/serve_load.py runs/workflow/final                 # ~2-3 minutes
    python benchmarks/serve_load.py RUN_DIR/export/model.onnx --clients 1,4,16
    python benchmarks/serve_load.py RUN --requests 40 --seconds 5 --out /tmp/serve.json   # smoke
Results: benchmarks/results/serve-<cpu>.json (or --out).
"""
from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

from imgflow.fileio import write_json
from imgflow.precision import default_threads
from imgflow.prediction import OnnxModel, RunModel, predict_images
from throughput import RESULTS, machine_info, machine_slug

HOST = "127.0.0.1"  # never anything else: this script loads only a server it started itself
BOUNDARY = "imgflow-load-test"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path, help="a finished run directory or an exported model.onnx")
    p.add_argument("--clients", default="1,16", help="concurrent clients, one level each (default: 1,16)")
    p.add_argument("--requests", type=int, default=200, help="requests per level, at most (default: 200)")
    p.add_argument("--seconds", type=float, default=60.0, help="seconds per level, at most (default: 60)")
    p.add_argument("--image", type=Path, help="the image to send (default: noise at the model's input size)")
    p.add_argument("--predict-images", type=int, default=256,
                   help="copies of the image timed through predict for comparison (default: 256; 0 = skip)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="passed to imgflow serve (default: 5)")
    p.add_argument("--out", type=Path, help="result file (default: benchmarks/results/serve-<cpu>.json)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# the image and predict's rate


def load_model(source: Path):
    return OnnxModel(source) if source.suffix.lower() == ".onnx" else RunModel(source)


def image_bytes(path: Path | None, size: tuple[int, int]) -> bytes:
    if path is not None:
        return path.read_bytes()
    H, W = size
    noise = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    return buffer.getvalue()


def predict_rate(model, data: bytes, copies: int) -> float | None:
    """Images/s of predict_images (decode + batched forward) on `copies` files of `data`."""
    if copies <= 0:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        files = [Path(tmp) / f"{i:05d}.img" for i in range(copies)]
        for f in files:
            f.write_bytes(data)
        predict_images(model, files[:8], progress=False)  # warm-up
        start = time.perf_counter()
        predict_images(model, files, progress=False)
        return copies / (time.perf_counter() - start)


# ----------------------------------------------------------------------------------------------
# the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_server(source: Path, port: int, wait_ms: float, log_file) -> subprocess.Popen:
    command = [sys.executable, "-m", "imgflow", "-q", "serve", str(source), "--host", HOST,
               "--port", str(port), "--batch-wait-ms", str(wait_ms)]
    server = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            log_file.seek(0)
            tail = log_file.read().decode(errors="replace").strip().splitlines()[-5:]
            raise SystemExit(f"imgflow serve exited with status {server.returncode}: " + " / ".join(tail))
        try:
            get_json(port, "/health")
            return server
        except OSError:
            time.sleep(0.2)
    stop_server(server)
    raise SystemExit("imgflow serve did not answer /health within 120 s")


def stop_server(server: subprocess.Popen) -> None:
    server.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown
    try:
        server.wait(15)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def get_json(port: int, path: str) -> dict:
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


# ----------------------------------------------------------------------------------------------
# the load


def multipart_body(data: bytes) -> bytes:
    head = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"load.png\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    return head + data + f"\r\n--{BOUNDARY}--\r\n".encode()


class Load:
    """Shared by the client threads: how many requests may still start, and what they measured."""

    def __init__(self, requests: int, seconds: float):
        self.left, self.deadline = requests, time.monotonic() + seconds
        self.latencies: list[float] = []
        self.errors = 0
        self.lock = threading.Lock()

    def claim(self) -> bool:
        with self.lock:
            if self.left <= 0 or time.monotonic() >= self.deadline:
                return False
            self.left -= 1
            return True

    def record(self, seconds: float, ok: bool) -> None:
        with self.lock:
            self.latencies.append(seconds)
            self.errors += not ok


def client(port: int, body: bytes, load: Load) -> None:
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    conn = http.client.HTTPConnection(HOST, port, timeout=60)
    try:
        while load.claim():
            start = time.perf_counter()
            try:
                conn.request("POST", "/predict", body=body, headers=headers)
                response = conn.getresponse()
                response.read()
                ok = response.status == 200
            except OSError:
                conn.close()  # reconnects on the next request
                ok = False
            load.record(time.perf_counter() - start, ok)
    finally:
        conn.close()


def run_level(port: int, body: bytes, clients: int, requests: int, seconds: float) -> dict:
    warm = Load(min(5, requests), seconds)
    client(port, body, warm)
    before = get_json(port, "/health")
    load = Load(requests, seconds)
    threads = [threading.Thread(target=client, args=(port, body, load)) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    after = get_json(port, "/health")
    return summarise(clients, load, elapsed, after["batches"] - before["batches"],
                     after["images"] - before["images"])


def summarise(clients: int, load: Load, elapsed: float, batches: int, images: int) -> dict:
    ms = np.asarray(load.latencies) * 1000
    p50, p90, p99 = (round(float(np.percentile(ms, q)), 2) for q in (50, 90, 99)) if len(ms) else (None,) * 3
    return {"clients": clients, "requests": len(ms), "errors": load.errors, "seconds": round(elapsed, 3),
            "requests_per_s": round(len(ms) / elapsed, 1) if elapsed > 0 else None,
            "latency_ms": {"p50": p50, "p90": p90, "p99": p99,
                           "max": round(float(ms.max()), 2) if len(ms) else None},
            "model_calls": batches, "mean_batch": round(images / batches, 2) if batches else None}


def format_table(record: dict) -> str:
    lines = [f"{'clients':>7}  {'requests':>8}  {'errors':>6}  {'req/s':>7}  {'p50 ms':>7}  {'p90 ms':>7}  "
             f"{'p99 ms':>7}  {'batch':>5}"]
    for r in record["levels"]:
        lat = r["latency_ms"]
        lines.append(f"{r['clients']:>7}  {r['requests']:>8}  {r['errors']:>6}  {r['requests_per_s']:>7}  "
                     f"{lat['p50']:>7}  {lat['p90']:>7}  {lat['p99']:>7}  {r['mean_batch'] or '-':>5}")
    if record["predict_images_per_s"]:
        lines.append(f"predict, batched: {record['predict_images_per_s']:.1f} images/s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model = load_model(args.source)
    data = image_bytes(args.image, model.spec.image_size)
    rate = predict_rate(model, data, args.predict_images)
    del model  # the server loads its own
    machine = machine_info(default_threads())
    record = {"benchmark": "serve_load", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "source": str(args.source), "image_bytes": len(data), "batch_wait_ms": args.batch_wait_ms,
              "limits": {"requests": args.requests, "seconds": args.seconds},
              "predict_images_per_s": round(rate, 1) if rate else None, "machine": machine, "levels": []}
    port = free_port()
    with tempfile.TemporaryFile() as log_file:
        server = start_server(args.source, port, args.batch_wait_ms, log_file)
        try:
            record["model"] = get_json(port, "/model")
            body = multipart_body(data)
            for clients in (int(c) for c in args.clients.split(",")):
                record["levels"].append(run_level(port, body, clients, args.requests, args.seconds))
        finally:
            stop_server(server)
    out = args.out or RESULTS / f"serve-{machine_slug(machine)}.json"
    write_json(out, record)
    print(format_table(record))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the imgflow command line sets it
    raise SystemExit(main())
