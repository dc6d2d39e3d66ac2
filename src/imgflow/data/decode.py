"""One image file's bytes -> a uint8 array, whatever Pillow mode it comes in.

Rules (documented for users in `load_dataset`):
- grayscale modes (1, L, LA, I, I;16*, F) give a (H, W) array, every other mode (H, W, 3) RGB;
  the folder loader makes the whole data set RGB unless every image is grayscale;
- 16-bit and 32-bit values are scaled to 0-255 (16-bit: / 257; float in [0, 1]: * 255; anything
  else out of range: stretched from its own min-max);
- alpha (RGBA, LA, PA, palette transparency) is composited on white, so transparent areas look as
  they do in an image viewer rather than showing whatever colour hides under alpha 0;
- EXIF orientation is applied; multi-frame files (GIF, TIFF) give their first frame;
- resizing stretches to the target size (no crop), as Keras' `image_dataset_from_directory` does.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

from imgflow.errors import UserError
from imgflow.text import plural

GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
RESAMPLE = Image.Resampling.BILINEAR  # Pillow's resize is antialiased when it shrinks


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """(H, W, C+1) uint8 with alpha last -> (H, W, C) uint8 over a white background."""
    alpha = rgba[..., -1:].astype(np.float32) / 255.0
    colour = rgba[..., :-1].astype(np.float32)
    return np.rint(colour * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)


def _scale_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    if mode.startswith("I;16"):
        return np.rint(a.astype(np.float32) / 257.0).astype(np.uint8)  # 65535 -> 255
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if mode == "F" and lo >= 0.0 and hi <= 1.0:
        return np.rint(a * 255.0).astype(np.uint8)
    if lo >= 0 and hi <= 255:
        return np.rint(a).astype(np.uint8)
    if mode == "I" and lo >= 0 and hi <= 65535:  # 16-bit data opened as 32-bit integers
        return np.rint(a.astype(np.float32) / 257.0).astype(np.uint8)
    span = hi - lo if hi > lo else 1.0
    return np.rint((a.astype(np.float64) - lo) * (255.0 / span)).astype(np.uint8)


def to_array(im: Image.Image) -> np.ndarray:
    """A loaded Pillow image -> (H, W) uint8 if grayscale, else (H, W, 3) uint8 RGB."""
    mode = im.mode
    if mode in ("RGB", "L"):  # the common case first: no conversion at all
        return np.asarray(im)
    if mode == "1":
        return np.asarray(im.convert("L"))
    if mode in ("LA", "La"):
        return _composite_on_white(np.asarray(im.convert("LA")))[..., 0]
    if mode in GRAY_MODES:  # I, I;16*, F
        return _scale_to_uint8(np.asarray(im), mode)
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode in _ALPHA_MODES:
        return _composite_on_white(np.asarray(im.convert("RGBA")))
    return np.asarray(im if mode == "RGB" else im.convert("RGB"))  # CMYK, YCbCr, LAB, HSV, ...


def decode_image(data: bytes, size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode image bytes to (H, W) or (H, W, 3) uint8; resize to `size` (H, W) when given.

    Raises whatever Pillow raises for a bad file (UnidentifiedImageError, OSError for truncated
    data, DecompressionBombError, ...): the caller turns that into a skipped file.
    """
    with Image.open(io.BytesIO(data)) as im:
        if size is not None and im.format == "JPEG":
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when that still covers the target:
            # a large photo shrunk to 64x64 then decodes several times faster.
            im.draft(im.mode, (size[1], size[0]))
        im.load()
        if "exif" in im.info:  # cheap test first: getexif() parses, most files have none
            im = ImageOps.exif_transpose(im)
        array = to_array(im)
    if size is not None and array.shape[:2] != tuple(size):
        array = resize_array(array, size)
    return array


def resize_array(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a (H, W) or (H, W, C) uint8 array to `size` = (H, W)."""
    H, W = size
    if array.ndim == 3 and array.shape[2] == 1:
        return resize_array(array[..., 0], size)[..., None]
    return np.asarray(Image.fromarray(array).resize((W, H), RESAMPLE))


def center_crop(images, size: tuple[int, int]):
    """The centre `size` (H, W) of a batch (N, H, W, C), NumPy array or tensor alike (a slice, no
    resampling); the top-left corner as Hugging Face's image processors place it: (H - h) // 2."""
    H, W = images.shape[1:3]
    h, w = size
    assert h <= H and w <= W, f"cannot crop {h}x{w} out of {H}x{W}"
    top, left = (H - h) // 2, (W - w) // 2
    return images[:, top:top + h, left:left + w]


def resize_images(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a batch (N, H, W, C) uint8 to (N, size[0], size[1], C)."""
    N, _, _, C = images.shape
    out = np.empty((N, size[0], size[1], C), dtype=np.uint8)
    for i in range(N):
        out[i] = resize_array(images[i], size).reshape(size[0], size[1], C)
    return out


def check_fits_in_memory(count: int, image_size: tuple[int, int], channels: int, source: str) -> None:
    """UserError before decoding or resizing when `count` uint8 images of `image_size` x
    `channels` cannot fit in the memory available."""
    need = count * image_size[0] * image_size[1] * channels
    available = available_memory()
    if available is not None and need > 0.8 * available:
        raise UserError(f"{plural(count, 'image')} of {image_size[0]}x{image_size[1]} from {source} need "
                        f"{need / 2**30:.1f} GiB in memory, more than the {available / 2**30:.1f} GiB "
                        "available: use a smaller --image-size")


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
