"""Hugging Face `transformers` image classifiers as imgflow models: `hf:<hub id or local dir>`.

An optional extra (`pip install 'imgflow[pretrained]'`). transformers rather than timm: timm
needs torchvision, whose wheel does not load with the CPU build of torch this project installs.
Nothing here touches the network unless `pretrained` asks for a hub download (through HF's own
cache); a local directory or file is read offline.
"""
from __future__ import annotations

import hashlib
import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from imgflow.errors import UserError
from imgflow.models.backbone import HeadAndBackbone

log = logging.getLogger(__name__)

PREFIX = "hf:"
INSTALL_HINT = "pip install 'imgflow[pretrained]'"
# What a fresh head is called in the models transformers ships (ResNet, ConvNeXt, ViT,
# EfficientNet, MobileViT, ...): everything else is the backbone.
HEAD_NAMES = ("classifier", "head")


def is_hf(name: str) -> bool:
    return name.startswith(PREFIX)


def hf_source(name: str) -> str:
    """The hub id or local directory of `hf:<source>`."""
    source = name[len(PREFIX):]
    if not source:
        raise UserError("hf: needs a hub id or a local directory, e.g. --model hf:microsoft/resnet-50")
    return source


def run_name(name: str) -> str:
    """A model name as one path component, for default run directories: `hf:/a/b/resnet-50`
    (or `hf:microsoft/resnet-50`) -> `hf-resnet-50`; other names unchanged."""
    if not is_hf(name):
        return name
    return "hf-" + (Path(hf_source(name).rstrip("/\\")).name or "model")


def extra_installed() -> bool:
    """Whether the `pretrained` extra (transformers) is installed, without importing it (seconds)."""
    import importlib.util

    try:
        return importlib.util.find_spec("transformers") is not None
    except (ImportError, ValueError):  # ValueError: sys.modules holds None for it (blocked)
        return False


def in_local_cache(hub_id: str) -> bool:
    """Whether Hugging Face's cache holds `hub_id`'s config and weights (reads the cache only)."""
    return cached_snapshot(hub_id) is not None


def cached_snapshot(hub_id: str) -> Path | None:
    """The directory of Hugging Face's cache that holds `hub_id`'s config and weights, to load
    offline as a local `hf:` directory; None when the cache lacks them (reads the cache only)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None

    def cached(name: str) -> Path | None:
        try:
            found = try_to_load_from_cache(hub_id, name)
        except ValueError:  # not a hub id at all (HFValidationError): a path that does not exist
            return None
        return Path(found) if isinstance(found, str) else None

    config = cached("config.json")
    weights = cached("model.safetensors") or cached("pytorch_model.bin")
    return config.parent if config is not None and weights is not None and weights.parent == config.parent else None


def _transformers():
    try:
        import transformers
    except ImportError:
        raise UserError(f"hf: models need Hugging Face transformers: {INSTALL_HINT}") from None
    return transformers


class HFClassifier(HeadAndBackbone, nn.Module):
    """A transformers image classifier returning plain logits; its backbone can be frozen
    (models.backbone)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values=x).logits

    def head_modules(self) -> list[nn.Module]:
        for name in HEAD_NAMES:
            head = getattr(self.net, name, None)
            if isinstance(head, nn.Module):
                return [head]
        raise UserError(f"cannot tell the head of {type(self.net).__name__} from its backbone "
                        f"(no {' or '.join(HEAD_NAMES)} module): train it without --finetune")


def _is_local(source: str) -> bool:
    return Path(source).exists()


def _hf_config(source: str, num_classes: int, pretrained: bool):
    transformers = _transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(
            source, local_files_only=not (pretrained and not _is_local(source)))
    except OSError as exc:
        raise UserError(f"cannot read the model config of hf:{source}: {str(exc).splitlines()[0]} "
                        "(a hub id is downloaded only with --pretrained; offline, pass a local "
                        "directory saved with save_pretrained)") from None
    config.num_labels = num_classes
    config.id2label = {i: str(i) for i in range(num_classes)}
    config.label2id = {str(i): i for i in range(num_classes)}
    return config


def build_hf(num_classes: int, in_channels: int, image_size: tuple[int, int], source: str,
             weights: str | None = None, pretrained: bool = False,
             hf_config: dict | None = None) -> HFClassifier:
    """The model `hf:<source>` with a new head of `num_classes`.

    weights: a local directory (save_pretrained) or a .safetensors/.bin file to start from;
    None: `source` itself when it is a local directory, the hub when `pretrained`, else the
    config's random initialisation (its architecture only: for predict and export, whose
    weights come from the run).
    hf_config: the architecture as a run's config.json recorded it (`architecture`): rebuilt
    from that alone, with random weights, wherever `source` has gone."""
    transformers = _transformers()
    if hf_config is not None:
        d = dict(hf_config)
        net = transformers.AutoModelForImageClassification.from_config(
            transformers.AutoConfig.for_model(d.pop("model_type"), **d))
        return HFClassifier(net)
    config = _hf_config(source, num_classes, pretrained)
    channels = getattr(config, "num_channels", in_channels)
    if channels != in_channels:
        raise UserError(f"hf:{source} takes {channels}-channel images, the data has {in_channels}")
    auto = transformers.AutoModelForImageClassification
    start = weights if weights is not None else (source if _is_local(source) or pretrained else None)
    if start is None:
        return HFClassifier(auto.from_config(config))
    if Path(start).is_file():
        net = auto.from_config(config)
        _load_file_into(net, Path(start))
        return HFClassifier(net)
    try:
        with _quiet(transformers):  # its load report tables the head we replace on purpose
            net = auto.from_pretrained(start, config=config, ignore_mismatched_sizes=True,
                                       local_files_only=not (pretrained and not _is_local(start)))
    except OSError as exc:
        raise UserError(f"cannot load weights from {start}: {str(exc).splitlines()[0]}") from None
    log.info("hf:%s: weights from %s, a new head of %d classes", source, start, num_classes)
    return HFClassifier(net)


@contextmanager
def _quiet(transformers) -> Iterator[None]:
    logging_ = transformers.utils.logging
    level = logging_.get_verbosity()
    bars = logging_.is_progress_bar_enabled()
    logging_.set_verbosity_error()
    logging_.disable_progress_bar()
    try:
        yield
    finally:
        logging_.set_verbosity(level)
        if bars:
            logging_.enable_progress_bar()


def _load_file_into(net: nn.Module, path: Path) -> None:
    """Backbone weights from one file; the head (of another number of classes) is left new."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    own = net.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not fitting:
        raise UserError(f"{path} holds no weights of this model's layers: is it the right file?")
    net.load_state_dict(fitting, strict=False)


def architecture(model: HFClassifier) -> dict:
    """The transformers config of `model` as JSON values (build_hf's `hf_config`)."""
    return json.loads(model.net.config.to_json_string())


def weights_file(start: Path) -> Path | None:
    """The file that holds the weights of a directory saved with save_pretrained (or `start`)."""
    if start.is_file():
        return start
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (start / name).is_file():
            return start / name
    return None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_source(source: str, weights: str | None, pretrained: bool) -> dict[str, Any]:
    """Where a run's starting weights came from, for config.json: a local file and its sha256,
    or a hub id and the revision HF's cache resolved."""
    start = weights if weights is not None else (source if _is_local(source) else None)
    if start is not None:
        path = Path(start).resolve()
        file = weights_file(path)
        return {"kind": "local", "path": str(path), "file": str(file) if file else None,
                "sha256": sha256_of(file) if file else None}
    if not pretrained:
        return {"kind": "none"}
    revision = None
    try:
        from huggingface_hub import HfApi

        revision = HfApi().model_info(source).sha
    except Exception:  # offline or no access: the cache served it; the id still names it
        pass
    return {"kind": "hub", "id": source, "revision": revision}


def hf_preprocessing(source: str, weights: str | None, pretrained: bool = False) -> dict[str, Any]:
    """The model's own mean, std and input size from its preprocessor_config.json: beside local
    weights, in the hf: directory, or (only with `pretrained`) from the hub; {} when there is none."""
    for place in (weights, source):
        if place is None or not _is_local(place):
            continue
        path = Path(place)
        found = path / "preprocessor_config.json" if path.is_dir() else path.parent / "preprocessor_config.json"
        if found.is_file():
            return _preprocessor_values(json.loads(found.read_text()))
    if pretrained and not _is_local(source):
        try:
            from huggingface_hub import hf_hub_download

            found = Path(hf_hub_download(source, "preprocessor_config.json"))
            return _preprocessor_values(json.loads(found.read_text()))
        except Exception as exc:  # a model without one: our own normalisation, said once
            log.warning("hf:%s has no preprocessor_config.json (%s): normalising as --normalize says",
                        source, type(exc).__name__)
    return {}


def _preprocessor_values(d: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "image_mean" in d and "image_std" in d:
        out["mean"], out["std"] = tuple(d["image_mean"]), tuple(d["image_std"])
    size = d.get("size")
    if isinstance(size, dict) and "height" in size and "width" in size:
        out["image_size"] = (int(size["height"]), int(size["width"]))
    elif isinstance(size, dict) and "shortest_edge" in size:
        out["image_size"] = (int(size["shortest_edge"]),) * 2
    elif isinstance(size, int):
        out["image_size"] = (size, size)
    out.update(_center_crop(d, out.get("image_size")))
    return out


# ConvNeXt's and ResNet's processors apply crop_pct only below this shortest edge (above, they resize).
_CROP_PCT_BELOW = 384


def _center_crop(d: dict, resized: tuple[int, int] | None) -> dict[str, Any]:
    """The model's evaluation crop from its preprocessor_config.json: {"crop_pct"} (ConvNeXt,
    ResNet: resize to size/crop_pct, crop size), or {"image_size": crop_size, "crop_pct"}
    (do_center_crop: resize to size, crop crop_size out of it); {} when it crops nothing."""
    if d.get("crop_pct") and resized and resized[0] < _CROP_PCT_BELOW:
        return {"crop_pct": float(d["crop_pct"])}
    crop = d.get("crop_size")
    if not d.get("do_center_crop") or not resized:
        return {}
    if isinstance(crop, dict) and "height" in crop and "width" in crop:
        crop = (int(crop["height"]), int(crop["width"]))
    elif isinstance(crop, int):
        crop = (crop, crop)
    else:
        return {}
    share = min(crop[0] / resized[0], crop[1] / resized[1])
    return {"image_size": crop, "crop_pct": round(share, 4)} if share < 1 else {}
