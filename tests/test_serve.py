"""`imgflow serve`: answers equal predict's, bad input gets a 4xx and the server goes on, batching,
start-up checks, and the upload page in a real headless browser."""
from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import re
import shutil
import socket
import struct
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datagen import make_image, png_bytes
from imgflow.cli import main
from imgflow.prediction import predict_files, read_image
from imgflow.runs import read_metrics
from imgflow.serving.batching import MicroBatcher
from imgflow.serving.model import ServedModel, decode_upload, load_served_model
from imgflow.serving.settings import ServeSettings

pytest.importorskip("fastapi", reason="imgflow serve needs pip install 'imgflow[serve]'")
pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx")
from fastapi.testclient import TestClient  # noqa: E402

from imgflow.serving.app import create_app  # noqa: E402

CLASSES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    """Files of several formats, sizes and modes, each carrying its class's colour."""
    root = tmp_path_factory.mktemp("serve-photos")
    rng = np.random.default_rng(7)
    specs = [("a_plain.png", 0, (16, 16), "RGB"), ("b_odd.jpg", 1, (30, 41), "RGB"),
             ("c_rgba.png", 2, (16, 16), "RGBA"), ("gray.png", 1, (9, 13), "L"),
             ("c_palette.gif", 2, (64, 48), "P")]
    paths = []
    for name, index, size, mode in specs:
        make_image(index, 3, size, mode=mode, rng=rng).save(root / name)
        paths.append(root / name)
    return paths


@pytest.fixture(scope="module")
def served(tiny_run) -> ServedModel:
    return load_served_model(tiny_run)


@pytest.fixture(scope="module")
def client(served):
    with TestClient(create_app(served, ServeSettings(max_upload_mb=1, max_files=4))) as c:
        yield c


def multipart(paths: list[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in paths]


def by_name(rows: list[dict]) -> dict[str, dict]:
    return {Path(r["image"]).name: r for r in rows}


def assert_same_predictions(served_rows: list[dict], predicted_rows: list[dict]) -> None:
    served_by, predicted_by = by_name(served_rows), by_name(predicted_rows)
    assert served_by.keys() == predicted_by.keys()
    for name, got in served_by.items():
        want = predicted_by[name]
        assert [t["class"] for t in got["top"]] == [t["class"] for t in want["top"]], name
        assert [t["probability"] for t in got["top"]] == pytest.approx(
            [t["probability"] for t in want["top"]], abs=1e-6), name


# ----------------------------------------------------------------------------------------------
# answers equal predict's


def test_upload_becomes_the_same_model_input_as_predict_reads(served, photos, tmp_path):
    for path in photos:
        np.testing.assert_array_equal(decode_upload(path.read_bytes(), served.model.spec, tmp_path),
                                      read_image(path, served.model.spec), err_msg=path.name)
    assert list(tmp_path.iterdir()) == []  # the scratch files are gone


def test_predict_top_k_equals_imgflow_predict(client, tiny_run, photos):
    response = client.post("/predict?top_k=2", files=multipart(photos[:4]))
    assert response.status_code == 200, response.text
    rows = response.json()["predictions"]
    assert [r["image"] for r in rows] == [p.name for p in photos[:4]]  # upload order
    assert all(set(r) == {"image", "top"} and len(r["top"]) == 2 for r in rows)
    assert_same_predictions(rows, predict_files(tiny_run, photos[:4], top_k=2, progress=False))


def test_raw_body_is_one_image_and_top_k_defaults_to_the_server_s(client, tiny_run, photos):
    path = photos[4]
    response = client.post("/predict", content=path.read_bytes(),
                           headers={"content-type": "image/gif", "x-filename": path.name})
    assert response.status_code == 200, response.text
    rows = response.json()["predictions"]
    assert len(rows) == 1 and rows[0]["image"] == path.name
    assert len(rows[0]["top"]) == 3  # the default 5, capped at the number of classes as predict caps it
    assert_same_predictions(rows, predict_files(tiny_run, [path], progress=False))


def test_onnx_model_is_served_as_predict_runs_it(tiny_run, photos, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    out = tmp_path_factory.mktemp("serve-export") / "export"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["export", str(tiny_run), "--format", "onnx", "--out", str(out)]) == 0
    onnx_served = load_served_model(out / "model.onnx")
    with TestClient(create_app(onnx_served)) as c:
        info = c.get("/model").json()
        response = c.post("/predict", files=multipart(photos))
    assert info["format"] == "onnx" and info["classes"] == CLASSES
    assert info["accuracy"] == read_metrics(tiny_run)["accuracy"]
    assert response.status_code == 200, response.text
    assert_same_predictions(response.json()["predictions"],
                            predict_files(None, photos, onnx=out / "model.onnx", progress=False))


def test_model_health_and_page(client, tiny_run):
    info = client.get("/model").json()
    assert info["format"] == "pytorch" and info["model"] == "seed-baseline"
    assert info["classes"] == CLASSES and info["input"] == {"image_size": [16, 16], "channels": 3}
    assert info["accuracy"] == read_metrics(tiny_run)["accuracy"]
    assert info["source"] == str(Path(tiny_run).resolve())
    assert info["limits"] == {"max_upload_mb": 1, "max_files": 4, "top_k": 5}
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["batches"] >= 0

    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert '<meta name="viewport"' in html
    assert re.search(r'<input[^>]*type="file"[^>]*accept="image/\*"[^>]*multiple', html)
    # Self-contained: no script, style, image or font fetched from anywhere else.
    assert not re.search(r'(src|href)\s*=\s*"(https?:)?//', html) and "@import" not in html
    assert "<script src" not in html and "<link" not in html


# ----------------------------------------------------------------------------------------------
# bad input: a 4xx with a message, and the server goes on


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels (what a decompression bomb looks like to Pillow)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) \
        + chunk(b"IEND", b"")


def truncated_png() -> bytes:
    data = png_bytes(make_image(0, 3, (64, 64), noise=80))  # noise: compresses badly, so cut is mid-data
    return data[: len(data) // 2]


BAD_UPLOADS = {
    "not an image": (b"this is not an image at all", 422, "not an image Pillow can read"),
    "truncated": (truncated_png(), 422, "truncated image"),
    "decompression bomb": (png_header_only(40_000, 40_000), 422, "decompression bomb"),
    "empty file": (b"", 422, "empty file"),
}


@pytest.mark.parametrize("kind", BAD_UPLOADS)
def test_bad_upload_gets_a_4xx_and_the_server_goes_on(client, photos, kind):
    data, status, words = BAD_UPLOADS[kind]
    response = client.post("/predict", files=[("files", ("bad.png", data, "image/png"))])
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and words in detail and "bad.png" in detail
    assert client.post("/predict", files=multipart(photos[:1])).status_code == 200


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_image_between_pillow_s_limit_and_twice_it_is_refused_too(client, photos, monkeypatch):
    # Pillow only warns there; predict treats the warning as an error, and so does the server.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 150)
    data = png_bytes(make_image(0, 3, (16, 16)))  # 256 pixels: over 150, under 300
    response = client.post("/predict", files=[("files", ("big.png", data, "image/png"))])
    assert response.status_code == 422 and "decompression bomb" in response.json()["detail"]
    monkeypatch.undo()
    assert client.post("/predict", files=multipart(photos[:1])).status_code == 200


def test_one_bad_file_among_good_ones_is_marked_as_predict_marks_it(client, photos):
    files = multipart(photos[:2]) + [("files", ("broken.png", b"not a PNG", "image/png"))]
    response = client.post("/predict", files=files)
    assert response.status_code == 200, response.text
    rows = by_name(response.json()["predictions"])
    assert rows["broken.png"] == {"image": "broken.png", "top": [], "error": "not an image Pillow can read"}
    assert all(len(rows[p.name]["top"]) == 3 for p in photos[:2])


def test_request_limits_get_their_4xx_and_the_server_goes_on(client, photos):
    def refused(response, status: int, words: str) -> None:
        assert response.status_code == status, response.text
        assert words in response.json()["detail"]
        assert client.post("/predict", files=multipart(photos[:1])).status_code == 200

    refused(client.post("/predict", content=b""), 400, "empty request")
    text_only = b'--x\r\nContent-Disposition: form-data; name="note"\r\n\r\nhello\r\n--x--\r\n'
    multipart_header = {"content-type": "multipart/form-data; boundary=x"}
    refused(client.post("/predict", content=text_only, headers=multipart_header), 400, "empty request")
    # 50 MB against the 1 MB limit: refused from its Content-Length, before it is read.
    refused(client.post("/predict", content=bytes(50 * 2**20)), 413, "--max-upload-mb")
    # No Content-Length (chunked): counted as it streams in.
    refused(client.post("/predict", content=iter([bytes(2**19)] * 4)), 413, "at most 1 MB")
    refused(client.post("/predict", files=multipart(photos[:1]) * 5), 400, "at most 4 files")
    refused(client.post("/predict?top_k=0", files=multipart(photos[:1])), 400, "top_k must be >= 1")


# ----------------------------------------------------------------------------------------------
# batching


def test_batcher_batches_concurrent_requests_and_splits_at_max_batch():
    forwarded = []

    def forward(images):  # "probabilities" that say which image they belong to
        forwarded.append(len(images))
        return images.reshape(len(images), -1)[:, :1].astype(np.float32)

    async def scenario():
        batcher = MicroBatcher(forward, max_batch=4, max_wait_s=0.05)
        await batcher.start()
        try:
            requests = [np.full((1 + i % 2, 2, 2, 1), i, dtype=np.uint8) for i in range(6)]  # 9 images
            answers = await asyncio.gather(*(batcher.submit(r) for r in requests))
        finally:
            await batcher.stop()
        return requests, answers, batcher

    requests, answers, batcher = asyncio.run(scenario())
    for request, answer in zip(requests, answers):
        assert answer.shape == (len(request), 1) and (answer == request[0, 0, 0, 0]).all()
    assert forwarded == [4, 4, 1] and batcher.calls == 3 and batcher.images == 9


class SlowModel:
    """The tiny run's model, 0.2 s slower per call, counting calls: requests pile up while it runs."""

    def __init__(self, model):
        self.model, self.spec, self.batch_size, self.calls = model, model.spec, model.batch_size, []

    def probabilities(self, images):
        self.calls.append(len(images))
        time.sleep(0.2)
        return self.model.probabilities(images)


def test_concurrent_requests_are_batched_with_correct_answers(served, tiny_run, photos):
    slow = SlowModel(served.model)
    app = create_app(ServedModel(slow, served.info), ServeSettings(batch_wait_ms=20))
    expected = by_name(predict_files(tiny_run, photos, progress=False))
    requests = [photos[i % len(photos)] for i in range(12)]
    with TestClient(app) as c, ThreadPoolExecutor(len(requests)) as pool:
        responses = list(pool.map(lambda p: c.post("/predict", files=multipart([p])), requests))
        health = c.get("/health").json()
    for path, response in zip(requests, responses):
        assert response.status_code == 200, response.text
        assert_same_predictions(response.json()["predictions"], [expected[path.name]])
    assert sum(slow.calls) == len(requests) and health["images"] == len(requests)
    assert len(slow.calls) < len(requests) / 2, f"not batched: model calls of {slow.calls} images"


# ----------------------------------------------------------------------------------------------
# the command


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def no_uvicorn_run(monkeypatch) -> list:
    """uvicorn.Server.run replaced: the command starts, binds and announces, then returns."""
    import uvicorn

    started = []
    monkeypatch.setattr(uvicorn.Server, "run",
                        lambda self, sockets=None: started.append([s.getsockname() for s in sockets]))
    return started  # the addresses bound, per start


def test_serve_binds_loopback_by_default(tiny_run, no_uvicorn_run, capsys, caplog):
    with caplog.at_level(logging.INFO, logger="imgflow"):
        rc, _, err = run_cli(capsys, "serve", str(tiny_run), "--port", "0")
    assert rc == 0, err
    assert [address[0] for address in no_uvicorn_run[0]] == ["127.0.0.1"]
    assert "reachable from this machine only" in caplog.text and "network" not in caplog.text
    assert "seed-baseline" in caplog.text and "3 classes" in caplog.text


def test_serve_on_all_interfaces_says_it_is_reachable_from_the_network(tiny_run, no_uvicorn_run, capsys,
                                                                         caplog):
    with caplog.at_level(logging.INFO, logger="imgflow"):
        rc, _, err = run_cli(capsys, "serve", str(tiny_run), "--host", "0.0.0.0", "--port", "0")
    assert rc == 0, err
    assert [address[0] for address in no_uvicorn_run[0]] == ["0.0.0.0"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("reachable from the network" in w for w in warnings), caplog.text


@pytest.mark.parametrize("what", ["empty dir", "unfinished run", "not onnx file", "missing"])
def test_serve_refuses_what_is_not_a_finished_run_in_one_line(tiny_run, tmp_path, what, no_uvicorn_run,
                                                               capsys):
    if what == "unfinished run":
        target = tmp_path / "run"
        shutil.copytree(tiny_run, target)
        (target / "model.safetensors").unlink()
    elif what == "not onnx file":
        target = tmp_path / "model.txt"
        target.write_text("hello")
    else:
        target = tmp_path / ("missing" if what == "missing" else "")
    rc, out, err = run_cli(capsys, "serve", str(target), "--port", "0")
    assert rc == 2 and out == "" and no_uvicorn_run == []
    assert err.startswith("imgflow: error: ") and err.count("\n") == 1, err


def test_serve_on_a_device_this_machine_lacks_is_one_line(tiny_run, no_uvicorn_run, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc, out, err = run_cli(capsys, "serve", str(tiny_run), "--port", "0", "--device", "cuda")
    assert rc == 2 and no_uvicorn_run == [] and err.count("\n") == 1 and "cuda" in err, err


def test_served_model_runs_on_the_device_asked_for(tiny_run):
    served = load_served_model(tiny_run, device="cpu")
    assert next(served.model.model.parameters()).device.type == "cpu"


def test_serve_without_the_serving_packages_says_what_to_install(tiny_run, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn now raises ImportError
    rc, out, err = run_cli(capsys, "serve", str(tiny_run))
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and "pip install 'imgflow[serve]'" in err, err


def test_serve_on_a_port_in_use_is_one_line(tiny_run, no_uvicorn_run, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        rc, _, err = run_cli(capsys, "serve", str(tiny_run), "--port", str(taken.getsockname()[1]))
    assert rc == 2 and "cannot listen on 127.0.0.1" in err and err.count("\n") == 1, err


def test_serve_process_answers_then_stops_on_ctrl_c_with_status_0(tiny_run, photos):
    """The real command: uvicorn on a socket, an upload, and Ctrl-C as the normal way to stop."""
    import signal
    import subprocess
    import urllib.request

    server = subprocess.Popen([sys.executable, "-m", "imgflow", "serve", str(tiny_run), "--port", "0"],
                              stderr=subprocess.PIPE, text=True)
    try:
        url, seen = None, []
        for line in server.stderr:  # the start-up lines name the port
            seen.append(line)
            match = re.search(r"open (http://127\.0\.0\.1:\d+/)", line)
            if match:
                url = match.group(1)
                break
        assert url, f"no address announced: {''.join(seen)}"
        request = urllib.request.Request(url + "predict", data=photos[0].read_bytes(),
                                         headers={"content-type": "image/png"})
        for _ in range(100):  # announced before uvicorn listens: wait for it
            try:
                answer = json.loads(urllib.request.urlopen(request, timeout=10).read())
                break
            except OSError:
                time.sleep(0.1)
        assert [t["class"] for t in answer["predictions"][0]["top"]][:1] == [
            predict_files(tiny_run, photos[:1], progress=False)[0]["top"][0]["class"]]
        server.send_signal(signal.SIGINT)
        rest = server.stderr.read()
        assert server.wait(30) == 0, rest
        assert "interrupted" not in rest and rest.rstrip().endswith("stopped")
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


# ----------------------------------------------------------------------------------------------
# the page, in a real browser


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")


@contextlib.contextmanager
def live_server(app):
    """The app under uvicorn on a free loopback port, in a thread: yields its base URL."""
    import uvicorn

    from imgflow.serving.server import open_socket

    sock = open_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def headless_chromium():
    """A Selenium driver for the system's chromium and chromedriver (nothing downloaded)."""
    webdriver = pytest.importorskip("selenium.webdriver",
                                    reason="the browser test needs pip install selenium")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=420,900"):  # a phone-sized window
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


@pytest.mark.browser
@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                    reason="no headless browser: apt-get install chromium chromium-driver (.ci/run does)")
def test_page_in_a_real_browser_shows_the_predicted_classes(served, tiny_run, tmp_path, monkeypatch):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must not try to download a browser
    uploads = []
    for index, name in ((0, "first.png"), (2, "second.png")):
        make_image(index, 3, (64, 64)).save(tmp_path / name)
        uploads.append(tmp_path / name)
    expected = {Path(r["image"]).name: r["top"][0]["class"]
                for r in predict_files(tiny_run, uploads, progress=False)}

    with live_server(create_app(served)) as url:
        driver = headless_chromium()
        try:
            driver.get(url)
            WebDriverWait(driver, 30).until(lambda d: "seed-baseline" in d.find_element(By.ID, "model").text)
            driver.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in uploads))
            WebDriverWait(driver, 60).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".card.done")) == 2)
            shown = {card.get_attribute("data-name"): [e.text for e in card.find_elements(By.CSS_SELECTOR, ".cls")]
                     for card in driver.find_elements(By.CSS_SELECTOR, ".card")}
            bars = [bar.get_attribute("style") for bar in driver.find_elements(By.CSS_SELECTOR, ".fill")]
        finally:
            driver.quit()
    assert {name: classes[0] for name, classes in shown.items()} == expected
    assert all(sorted(classes) == CLASSES for classes in shown.values())  # top 3 of 3 classes each
    assert len(bars) == 6 and all(re.search(r"width: \d+(\.\d+)?%", b) for b in bars)
