"""Devices: resolving --device, the precision each device gets, device-independent checkpoints and
weights, fp16 with a gradient scaler, out-of-memory as one line. All on the CPU: CI has no GPU, so
the CUDA and MPS paths are tested as decisions (torch's answers faked), never on the hardware."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import train_tiny
from imgflow.cli import main
from imgflow.data import Split
from imgflow.device import check_device_spec, describe_device, device_line, resolve_device
from imgflow.errors import UserError
from imgflow.precision import choose_precision, grad_scaler, resolve_precision
from imgflow.training.config import TrainConfig

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="tests the message of a machine without CUDA")


@pytest.fixture
def cpu_only(monkeypatch):
    """torch as it is on a machine with neither CUDA nor MPS, whatever this one has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch):
    """torch as it is on a machine with two CUDA GPUs (nothing is run on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


# ---------------------------------------------------------------------------------------------
# resolving --device


def test_auto_is_the_cpu_without_cuda_or_mps(cpu_only):
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_auto_prefers_cuda_then_mps(monkeypatch, two_gpus):
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")


def test_a_gpu_number_past_the_last_names_the_ones_there(two_gpus):
    with pytest.raises(UserError, match=r"has 2 CUDA GPUs \(cuda:0 to cuda:1\)"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("spec", ["cuda", "cuda:0"])
def test_cuda_without_cuda_says_how_to_get_it(cpu_only, monkeypatch, spec):
    monkeypatch.setattr(torch.version, "cuda", None)  # a CPU build, as here and in CI
    with pytest.raises(UserError) as caught:
        resolve_device(spec)
    message = str(caught.value)
    assert "\n" not in message and "CPU build" in message and torch.__version__ in message
    assert "make setup TORCH=cuda" in message and "--device cpu" in message
    # A CUDA build on a machine whose GPU is not usable: driver, visible devices.
    monkeypatch.setattr(torch.version, "cuda", "12.6")
    with pytest.raises(UserError, match="nvidia-smi.*--device cpu"):
        resolve_device(spec)


def test_mps_without_mps_is_one_line(cpu_only):
    with pytest.raises(UserError, match="MPS.*--device cpu"):
        resolve_device("mps")


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cuda:x", "CPU", "", "tpu"])
def test_unknown_device_kinds_are_refused(spec):
    with pytest.raises(UserError, match="unknown device"):
        check_device_spec(spec)
    with pytest.raises(UserError, match="unknown device"):
        TrainConfig("data", "seed-baseline", device=spec).validate()


def test_the_cpu_is_described_with_the_torch_build(cpu_only):
    facts = describe_device(torch.device("cpu"))
    assert facts["device"] == "cpu" and facts["gpu"] is None and facts["torch"] == torch.__version__
    assert facts["build"] in ("CPU", f"CUDA {torch.version.cuda}")
    assert f"torch {torch.__version__}" in device_line() and "device auto: cpu" in device_line()


def test_version_names_the_torch_build_and_device(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("imgflow ") and f"torch {torch.__version__}" in out and "device auto:" in out


# ---------------------------------------------------------------------------------------------
# precision per device


@pytest.mark.parametrize("requested, device, native_bf16, chosen", [
    ("auto", "cuda", True, "bf16"),  # Ampere and later
    ("auto", "cuda", False, "fp16"),  # older GPUs: fp16 with a gradient scaler
    ("auto", "cpu", True, "bf16"),  # AVX-512 BF16 / AMX
    ("auto", "cpu", False, "fp32"),  # emulated bf16 is slower than fp32
    ("auto", "mps", False, "fp32"),
    ("fp32", "cuda", True, "fp32"),  # an explicit choice stays
    ("bf16", "cpu", False, "bf16"),
    ("fp16", "cpu", True, "fp16"),
])
def test_precision_auto_follows_the_device(requested, device, native_bf16, chosen):
    assert choose_precision(requested, device, native_bf16) == chosen


def test_resolve_precision_asks_the_gpu_about_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert resolve_precision("auto", torch.device("cuda", 0)) == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_precision("auto", torch.device("cuda", 0)) == "bf16"


def test_only_fp16_gets_a_gradient_scaler():
    assert grad_scaler("fp32") is None and grad_scaler("bf16") is None
    assert isinstance(grad_scaler("fp16", "cpu"), torch.amp.GradScaler)


def _learner(precision: str):
    from imgflow.models import create_model
    from imgflow.preprocess import Preprocessing
    from imgflow.training.step import Learner

    torch.manual_seed(0)
    config = TrainConfig("", "seed-baseline", precision=precision, optimizer="sgd", lr=0.01)
    model = create_model("seed-baseline", num_classes=3, in_channels=3, image_size=(16, 16))
    return Learner(model.to(memory_format=torch.channels_last), config,
                   Preprocessing((0.0,) * 3, (1.0,) * 3, (16, 16), 3), precision, total_steps=10)


def _batch(n: int = 16):
    gen = torch.Generator().manual_seed(0)
    return (torch.randint(0, 256, (n, 16, 16, 3), dtype=torch.uint8, generator=gen),
            torch.randint(0, 3, (n,), generator=gen))


def test_fp16_trains_through_the_gradient_scaler():
    """fp16 autocast runs on this CPU too, so the scaler's path is tested on the real thing."""
    learner = _learner("fp16")
    assert learner.scaler is not None
    images, labels = _batch()
    before = {k: v.clone() for k, v in learner.model.state_dict().items()}
    logits, loss = learner.train_step(images, labels, 0.01, 1)
    assert logits.dtype == torch.float16 and loss.dtype == torch.float32  # autocast, loss in fp32
    assert any(not torch.equal(before[k], v) for k, v in learner.model.state_dict().items())
    assert learner.state_dict()["scaler"]["scale"] == learner.scaler.get_scale()


def test_fp16_skips_a_step_whose_gradients_overflow_and_lowers_the_scale():
    learner = _learner("fp16")
    learner.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 100)  # gradients overflow fp16
    images, labels = _batch()
    before = {k: v.clone() for k, v in learner.model.state_dict().items()}
    learner.train_step(images, labels, 0.01, 1)
    assert all(torch.equal(before[k], v) for k, v in learner.model.state_dict().items())
    assert learner.scaler.get_scale() < 2.0 ** 100


def test_the_scaler_state_resumes():
    learner = _learner("fp16")
    learner.train_step(*_batch(), 0.01, 1)
    learner.scaler.update(1234.0)
    again = _learner("fp16")
    again.load_state_dict(learner.state_dict())
    assert again.scaler.get_scale() == 1234.0
    again.load_state_dict({**learner.state_dict(), "scaler": None})  # a checkpoint from before fp16


def test_a_run_in_fp16_learns(tiny_data, tmp_path):
    result = train_tiny(tiny_data, tmp_path / "run", precision="fp16", device="cpu")
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["precision"] == "fp16"


# ---------------------------------------------------------------------------------------------
# training on a device, recorded; checkpoints and weights that load anywhere


def test_device_cpu_trains_and_is_recorded(tiny_data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["-q", "train", str(tiny_data), "--model", "seed-baseline", "--epochs", "1",
                 "--batch-size", "16", "--device", "cpu", "--out", str(run_dir)]) == 0
    config = json.loads((run_dir / "config.json").read_text())
    assert config["train"]["device"] == "cpu"
    assert config["device"]["device"] == "cpu" and config["device"]["gpu"] is None
    assert config["device"]["torch"] == torch.__version__


@NO_CUDA
@pytest.mark.parametrize("command", [
    ["train", "{data}", "--model", "seed-baseline", "--out", "{tmp}/run"],
    ["evaluate", "{run}"],
    ["predict", "{run}", "{data}"],
    ["export", "{run}", "--out", "{tmp}/export"],
    ["workflow", "{data}", "--out", "{tmp}/workflow"],
    ["tune", "{data}", "--model", "seed-baseline", "--out", "{tmp}/tune"],
    ["reproduce-seed", "{data}", "--out", "{tmp}/reproduce"],
])
def test_device_cuda_without_cuda_is_one_line_and_exit_2(tiny_data, tiny_run, tmp_path, capsys, command):
    args = [a.format(data=tiny_data, run=tiny_run, tmp=tmp_path) for a in command] + ["--device", "cuda"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("imgflow: error: --device cuda: ")
    assert "make setup TORCH=cuda" in err and "--device cpu" in err
    assert [p.name for p in tmp_path.iterdir()] == []  # nothing written


def test_evaluate_and_predict_take_device_cpu(tiny_run, tiny_data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    assert main(["evaluate", str(run_dir), "--device", "cpu", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["device"] == "cpu"
    assert metrics["accuracy"] == json.loads((tiny_run / "metrics.json").read_text())["accuracy"]
    image = next((tiny_data / "test").rglob("*.png"))
    assert main(["predict", str(run_dir), str(image), "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["top"]


def _interrupted_run(tiny_data, run_dir, **overrides):
    """A run stopped (resumably) after its first epoch of two."""
    class Stop(Exception):
        pass

    def stop(row):
        raise Stop

    from imgflow.training.config import resolve_config
    from imgflow.training.loop import train

    config = resolve_config(str(tiny_data), dict(model="seed-baseline", epochs=2, batch_size=16,
                                                 precision="fp32", **overrides))
    with pytest.raises(Stop):
        train(config, run_dir, progress=False, on_epoch=stop)
    return config


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def test_checkpoint_and_weights_hold_cpu_tensors(tiny_data, tiny_run, tmp_path):
    _interrupted_run(tiny_data, tmp_path / "run", optimizer="adam", ema=0.9, early_stopping=5)
    checkpoint = torch.load(tmp_path / "run" / "checkpoint" / "state.pt", weights_only=True)
    tensors = list(_tensors(checkpoint))
    assert len(tensors) > 10 and all(t.device.type == "cpu" for t in tensors)
    assert checkpoint["cuda_rng"] is None and checkpoint["best"]["state"]  # the CPU's RNG only, here
    weights = load_file(str(tiny_run / "model.safetensors"))
    assert all(t.device.type == "cpu" for t in weights.values())


def test_weights_copied_for_saving_are_on_the_cpu():
    from imgflow.weights import detached_copy

    model = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    copy = detached_copy(model.state_dict())
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in copy.values())
    copy["weight"].add_(1)  # a copy, not a view of the live weights
    assert not torch.equal(copy["weight"], model.weight)


def test_a_checkpoint_written_on_a_gpu_resumes_on_the_cpu(tiny_data, tmp_path, monkeypatch, caplog):
    """The checkpoint's tensors are tagged as a GPU would tag them ('cuda:0'), and config.json says
    the run started on a GPU: --resume on this CPU continues it, with a warning."""
    run_dir = tmp_path / "run"
    _interrupted_run(tiny_data, run_dir)
    path = run_dir / "checkpoint" / "state.pt"
    state = torch.load(path, weights_only=True)
    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
    torch.save(state, path)
    monkeypatch.undo()
    if not torch.cuda.is_available():  # the file really is a GPU's: torch.load alone refuses it here
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)
    config = json.loads((run_dir / "config.json").read_text())
    config["device"] = {**config["device"], "device": "cuda:0", "name": "NVIDIA H200", "gpu": "NVIDIA H200"}
    (run_dir / "config.json").write_text(json.dumps(config))
    with caplog.at_level("WARNING"):
        result = train_tiny(tiny_data, run_dir, resume=True, epochs=2, device="cpu")
    assert "started on cuda:0 (NVIDIA H200): continuing on cpu" in caplog.text
    assert [row["epoch"] for row in result.history] == [1, 2]
    assert (run_dir / "model.safetensors").is_file()


def test_resume_with_another_device_value_is_allowed(tiny_data, tmp_path, caplog):
    """--device is not part of what a run means: auto and cpu resume each other (the same device
    here, so without a warning)."""
    run_dir = tmp_path / "run"
    _interrupted_run(tiny_data, run_dir)  # device auto
    with caplog.at_level("WARNING"):
        train_tiny(tiny_data, run_dir, resume=True, epochs=2, device="cpu")
    assert "continuing on" not in caplog.text
    assert (run_dir / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------
# out of memory


def test_out_of_memory_is_one_line_suggesting_a_smaller_batch(tiny_data, tmp_path, monkeypatch, capsys):
    from imgflow.training.step import Learner

    real_step, calls = Learner.train_step, []

    def step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 8:  # in epoch 2, after epoch 1's checkpoint
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(Learner, "train_step", step)
    run_dir = tmp_path / "run"
    code = main(["-q", "train", str(tiny_data), "--model", "seed-baseline", "--epochs", "2",
                 "--batch-size", "16", "--out", str(run_dir)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "ran out of memory" in err and "smaller --batch-size (now 16)" in err and "--resume" in err
    checkpoint = torch.load(run_dir / "checkpoint" / "state.pt", weights_only=True)
    assert checkpoint["epoch"] == 1  # the last good checkpoint is kept
    monkeypatch.setattr(Learner, "train_step", real_step)
    assert main(["-q", "train", "--resume", "--out", str(run_dir)]) == 0


# ---------------------------------------------------------------------------------------------
# the data and the batches on the device


@pytest.mark.parametrize("augment", ["none", "flip+translate+cutout"])
def test_batches_are_the_same_held_on_the_device_or_sent_over(monkeypatch, augment):
    """Both paths of EpochBatches (data held on the device, or assembled on the host and sent)
    give the same batches: the random draws are the CPU's either way."""
    import imgflow.training.batches as batches_module

    rng = np.random.default_rng(0)
    part = Split(rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8), rng.integers(0, 3, 40))
    config = TrainConfig("", "seed-baseline", batch_size=16, augment=augment, flip="random")
    held = batches_module.EpochBatches(part, config, torch.device("cpu"))
    monkeypatch.setattr(batches_module, "fits_on_device", lambda nbytes, device: False)
    sent = batches_module.EpochBatches(part, config, torch.device("cpu"))
    default = batches_module.EpochBatches(part, config)
    for epoch, step in [(0, 0), (1, 2)]:
        (xa, ya), (xb, yb), (xc, yc) = held.batch(epoch, step), sent.batch(epoch, step), default.batch(epoch, step)
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(xa, xc) and torch.equal(ya, yc)
        assert xa.device.type == "cpu" and xa.dtype == torch.uint8


def test_data_is_held_on_a_gpu_only_when_it_fits(monkeypatch):
    from imgflow.device import fits_on_device

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * 2**30, 80 * 2**30))
    gpu = torch.device("cuda", 0)
    assert fits_on_device(150 * 2**20, gpu)  # CIFAR-10 in 4 GiB free
    assert not fits_on_device(2 * 2**30, gpu)  # more than a quarter of what is free
    assert fits_on_device(100 * 2**30, torch.device("cpu"))  # already there


def test_inference_returns_cpu_logits_and_preprocessing_stays_on_the_images_device():
    from imgflow.inference import predict_logits
    from imgflow.preprocess import Preprocessing, to_model_input

    prep = Preprocessing((0.5,) * 3, (0.25,) * 3, (16, 16), 3)
    images, _ = _batch(5)
    x = to_model_input(images, prep)
    assert x.device == images.device and x.shape == (5, 3, 16, 16)
    model = _learner("fp32").model.eval()
    logits = predict_logits(model, images.numpy(), prep, batch_size=2, tta=True)
    assert logits.device.type == "cpu" and logits.shape == (5, 3)


def test_the_workflow_probe_measures_on_the_device(cpu_only):
    from imgflow.workflow.throughput import probe_throughput

    images = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    assert probe_throughput("seed-baseline", images, np.arange(8) % 2, 2, 1, "cpu") > 0
    with pytest.raises(UserError, match="--device cuda"):
        probe_throughput("seed-baseline", images, np.arange(8) % 2, 2, 1, "cuda")


# ---------------------------------------------------------------------------------------------
# on a real GPU (marked gpu; skipped without CUDA, as in CI)

NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@NEEDS_CUDA
def test_a_gpu_run_saves_weights_that_score_the_same_on_the_cpu(tiny_data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["-q", "train", str(tiny_data), "--model", "seed-batchnorm", "--epochs", "3", "--batch-size", "16",
                 "--device", "cuda", "--out", str(run_dir)]) == 0
    config = json.loads((run_dir / "config.json").read_text())
    assert config["device"]["type"] == "cuda" and config["device"]["gpu"] == torch.cuda.get_device_name(0)
    assert config["precision"] in ("bf16", "fp16")  # precision auto on a GPU
    weights = load_file(str(run_dir / "model.safetensors"))
    assert weights and all(t.device.type == "cpu" for t in weights.values())
    gpu_accuracy = json.loads((run_dir / "metrics.json").read_text())["accuracy"]
    capsys.readouterr()
    assert main(["evaluate", str(run_dir), "--device", "cpu", "--json"]) == 0
    # The CPU computes in fp32 what the GPU computed under autocast: a test image near a decision
    # boundary may flip, no more than a couple of the 39.
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(gpu_accuracy, abs=2 / 39)


@pytest.mark.gpu
@NEEDS_CUDA
@pytest.mark.parametrize("first, then", [("cuda", "cpu"), ("cpu", "cuda")])
def test_a_run_resumes_across_the_gpu_and_the_cpu(tiny_data, tmp_path, caplog, first, then):
    run_dir = tmp_path / "run"
    _interrupted_run(tiny_data, run_dir, device=first)
    with caplog.at_level("WARNING"):
        result = train_tiny(tiny_data, run_dir, resume=True, epochs=2, device=then)
    assert f"continuing on {resolve_device(then)}" in caplog.text
    assert [row["epoch"] for row in result.history] == [1, 2]
    assert all(t.device.type == "cpu" for t in load_file(str(run_dir / "model.safetensors")).values())
