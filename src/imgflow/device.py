"""Decide the device once (CUDA, Apple's MPS or the CPU), describe it, and keep its failures to one line.

Everything that runs a model takes a device spec ("auto", "cpu", "cuda", "cuda:N", "mps") and
resolves it here; tensors then follow the model's device. Nothing outside this module and
`precision` asks torch which hardware there is.
"""
from __future__ import annotations

import contextlib
import os
import platform
import re
from collections.abc import Iterator

import torch

from imgflow.errors import UserError
from imgflow.text import plural

_SPEC = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
# The training data is held on the GPU (uint8, augmented there) when it takes at most this
# fraction of the memory free: CIFAR-10's 150 MB is nothing to a GPU, and the rest stays for
# activations. Larger sets stay in host memory and go over batch by batch.
DATA_ON_DEVICE_FRACTION = 0.25
MAKE_CUDA = "make setup TORCH=cuda"


def check_device_spec(spec: str) -> str:
    """`spec` if it names a device kind we know (torch is not asked whether it is there)."""
    if not isinstance(spec, str) or not _SPEC.fullmatch(spec):
        raise UserError(f"unknown device {spec!r}: use auto, cpu, cuda, cuda:N (N a GPU's number) or mps")
    return spec


def torch_build() -> str:
    """What this PyTorch was built for: 'CUDA 12.6', 'ROCm 6.2' or 'CPU'."""
    if torch.version.cuda:
        return f"CUDA {torch.version.cuda}"
    if getattr(torch.version, "hip", None):
        return f"ROCm {torch.version.hip}"
    return "CPU"


def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """The torch.device `spec` means here; UserError (one line, what to do) when it is absent."""
    if isinstance(spec, torch.device):
        return spec
    check_device_spec(spec)
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps") if mps_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not mps_available():
            raise UserError("--device mps: Apple's Metal (MPS) is not available here (it needs a Mac with "
                            "Apple silicon and macOS 12.3 or later): pass --device cpu")
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise UserError(no_cuda_message(spec))
    count = torch.cuda.device_count()
    index = int(spec.partition(":")[2] or torch.cuda.current_device())
    if index >= count:
        raise UserError(f"--device {spec}: this machine has {plural(count, 'CUDA GPU')} "
                        f"(cuda:0 to cuda:{count - 1})")
    return torch.device("cuda", index)


def no_cuda_message(spec: str) -> str:
    """Why `--device cuda` cannot work here, and the two ways out."""
    if not torch.version.cuda:
        return (f"--device {spec}: this PyTorch ({torch.__version__}) is a CPU build, without CUDA: "
                f"install a CUDA build with '{MAKE_CUDA}' (README, 'Install'), or pass --device cpu")
    return (f"--device {spec}: PyTorch {torch.__version__} (built for CUDA {torch.version.cuda}) finds no "
            "usable GPU: check the driver (nvidia-smi) and CUDA_VISIBLE_DEVICES, or pass --device cpu")


def device_name(device: torch.device) -> str:
    """The GPU's name ('NVIDIA H200'), 'Apple MPS', or the CPU's model name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    from imgflow.precision import cpu_info

    return cpu_info().get("model name") or platform.processor() or platform.machine()


def describe_device(device: torch.device) -> dict:
    """The device a run used, for config.json: {"device", "type", "name", "gpu", "torch", "build", ...}."""
    facts = {"device": str(device), "type": device.type, "name": device_name(device),
             "gpu": None, "torch": torch.__version__, "build": torch_build()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                     memory_gib=round(props.total_memory / 2**30, 1))
    elif device.type == "mps":
        facts["gpu"] = "Apple MPS"
    return facts


def device_line(spec: str = "auto") -> str:
    """One line for `imgflow --version`: the torch build and what `--device spec` picks here."""
    build = f"torch {torch.__version__} ({torch_build()} build)"
    try:
        device = resolve_device(spec)
    except UserError as exc:
        return f"{build}; device: {exc}"
    return f"{build}; device {spec}: {device} ({device_name(device)})"


def fits_on_device(nbytes: int, device: torch.device, fraction: float = DATA_ON_DEVICE_FRACTION) -> bool:
    """True when `nbytes` of data may live on `device` (always on the CPU: it is already there)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return nbytes <= fraction * free
    if device.type == "mps":
        limit = getattr(torch.mps, "recommended_max_memory", None)
        return limit is not None and nbytes <= fraction * (limit() - torch.mps.driver_allocated_memory())
    return True


def configure_for_training(device: torch.device) -> None:
    """Settings that decide what a seed promises on this device (README, 'GPUs and several processes').

    On CUDA: no cuDNN autotuning (cudnn.benchmark times candidate kernels and may pick another one
    the next time, so a run or its resume would not repeat), deterministic cuDNN and cuBLAS
    kernels, and a warning (not a failure) from any op that has no deterministic version. On the
    CPU the kernels are deterministic for a given thread count already.
    """
    if device.type != "cuda":
        return
    # cuBLAS is deterministic only with a fixed workspace; read when cuBLAS starts, so set early.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.cuda.set_device(device)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)


@contextlib.contextmanager
def full_fp32(device: torch.device) -> Iterator[None]:
    """fp32 without TF32 on CUDA (its 10-bit mantissa would fail export's 1e-4 parity check)."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA out-of-memory error (torch.OutOfMemoryError), or MPS's, which is a plain RuntimeError."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "MPS backend out of memory" in str(exc))


@contextlib.contextmanager
def out_of_memory_as_user_error(device: torch.device, advice: str) -> Iterator[None]:
    """Turn the device running out of memory into one line ending with `advice`."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        if device.type == "cuda":
            torch.cuda.empty_cache()
        raise UserError(f"{device} ({device_name(device)}) ran out of memory: {advice}") from None
