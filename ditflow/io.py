"""Photos in and out: loading (EXIF orientation, ICC, alpha, 16-bit, CMYK, palettes), lossless
atomic saving, budget-exact quantisation, quality metrics, and the JSONL manifest of a run."""

from __future__ import annotations

import json
import math
import os
import secrets
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

MIN_SIDE = 16
DEFAULT_MAX_PIXELS = 64_000_000


class ImageError(Exception):
    """A photo that cannot be processed; the message says why and what to do."""


@dataclass
class Photo:
    """A loaded photo. ``pixels``: uint8 [H, W, 3] RGB after EXIF orientation; ``alpha``:
    uint8 [H, W] or None; ``icc``: the embedded colour profile (kept on save) or None."""

    path: Path
    pixels: np.ndarray
    alpha: np.ndarray | None
    icc: bytes | None
    note: str = ""

    def tensor(self) -> torch.Tensor:
        """float [3, H, W] in [0, 1]."""
        return torch.from_numpy(self.pixels).permute(2, 0, 1).float() / 255


def load_photo(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Photo:
    """Load a photo for protection, or raise :class:`ImageError` naming the problem."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: " + ("a folder, not a photo" if path.is_dir()
                                         else "no such file"))
    old_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{path}: {exc} (the decompression-bomb guard; raise --max-pixels if "
                         "the photo is genuine)") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{path}: corrupt or truncated image ({exc})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = old_limit
    notes = []
    icc = image.info.get("icc_profile")
    image = ImageOps.exif_transpose(image)
    if image.width < MIN_SIDE or image.height < MIN_SIDE:
        raise ImageError(f"{path}: {image.width}x{image.height} is too small (at least "
                         f"{MIN_SIDE} px per side)")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        image, note = _to_8bit(image)
        notes.append(note)
    if image.mode == "CMYK":
        image = image.convert("RGB")
        icc = None  # a CMYK profile does not describe the RGB result
        notes.append("CMYK converted to RGB")
    alpha = None
    if image.mode == "P" or image.mode == "PA":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        alpha = np.asarray(image.getchannel("A")).copy()
    if image.mode not in ("RGB",):
        image = image.convert("RGB")
    return Photo(path, np.asarray(image).copy(), alpha, icc, "; ".join(notes))


def _to_8bit(image):
    """A 16-bit, 32-bit integer or floating-point single-channel image as 8-bit, and a note:
    floats are read as 0..1 (or 0..255, 0..65535 when larger values occur), integers by their
    bit depth."""
    from PIL import Image

    wide = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        top = wide.max(initial=0.0)
        full = 1.0 if top <= 1.0 else 255.0 if top <= 255.0 else 65535.0
        note = "floating-point input written as 8-bit"
    else:
        full = 65535.0 if image.mode != "I" or wide.max(initial=0) <= 65535 else 2.0**32 - 1
        note = f"{16 if full == 65535.0 else 32}-bit input written as 8-bit"
    eight = np.clip(wide / full * 255.0, 0, 255).round().astype(np.uint8)
    return Image.fromarray(eight), note


def pixels_tensor(image) -> torch.Tensor:
    """A PIL image, uint8 array [H, W, 3] or float tensor [3, H, W] in [0, 1] -> float
    [3, H, W] in [0, 1]."""
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3 or not image.is_floating_point():
            raise ValueError(f"image tensor of shape {tuple(image.shape)} and dtype "
                             f"{image.dtype}; expected float [3, H, W] in [0, 1]")
        return image.float()
    array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"image array of shape {array.shape} and dtype {array.dtype}; "
                         "expected uint8 [H, W, 3]")
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255


def to_uint8(image: np.ndarray) -> np.ndarray:
    """A pipeline's float image in [0, 1] (``output_type="np"``, [H, W, 3]) as uint8."""
    return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)


def quantize_within_budget(original: np.ndarray, protected: torch.Tensor, epsilon: float
                           ) -> np.ndarray:
    """uint8 [H, W, 3] from a float [3, H, W] result, with |protected - original| <= epsilon
    holding exactly after rounding (epsilon in 0..255 units)."""
    budget = math.floor(epsilon + 1e-9)
    values = np.rint(protected.clamp(0, 1).permute(1, 2, 0).numpy() * 255)
    low = original.astype(np.int16) - budget
    high = original.astype(np.int16) + budget
    return np.clip(values, np.maximum(low, 0), np.minimum(high, 255)).astype(np.uint8)


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: a crash never leaves a
    half-written file under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    # created as any new file is (0666 less the umask), not private like mkstemp's
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_photo(path: Path, pixels: np.ndarray, alpha: np.ndarray | None = None,
               icc: bytes | None = None, jpeg_quality: int = 95) -> None:
    """Save atomically; PNG (lossless) unless the suffix asks for JPEG. Alpha and ICC kept
    (JPEG drops alpha)."""
    from PIL import Image

    image = Image.fromarray(pixels)
    is_jpeg = path.suffix.lower() in (".jpg", ".jpeg")
    if alpha is not None and not is_jpeg:
        image.putalpha(Image.fromarray(alpha))
    options = {"icc_profile": icc} if icc else {}
    if is_jpeg:
        options.update(quality=jpeg_quality, subsampling=0)

    def write(tmp):
        image.save(tmp, format="JPEG" if is_jpeg else "PNG", **options)

    _atomic_write(path, write)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM over RGB channels (Gaussian window 11, sigma 1.5; Wang et al. 2004; images
    thinner than 11 px get a window as wide as they are)."""
    x = torch.tensor(a, dtype=torch.float64).permute(2, 0, 1)[:, None]
    y = torch.tensor(b, dtype=torch.float64).permute(2, 0, 1)[:, None]
    size = min(11, *a.shape[:2])
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * 1.5**2))
    window = (g[:, None] * g[None, :] / g.sum() ** 2)[None, None]

    def blur(t):
        return F.conv2d(t, window)

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    value = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(value.mean())


class Manifest:
    """JSONL record of a run, one line per photo, appended and flushed as each photo finishes,
    so a crash loses nothing that was done. ``run_fields`` go into every appended record."""

    def __init__(self, path: Path, run_fields: dict | None = None):
        self.path = path
        self.run_fields = run_fields or {}
        self.records: dict[str, dict] = {}
        if path.exists():
            for line in path.read_text(errors="replace").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a crash: that photo is simply redone
                if isinstance(record, dict) and "input" in record:
                    self.records[record["input"]] = record

    def finished(self, source: Path, output: Path) -> bool:
        record = self.records.get(str(source.resolve()))
        return bool(record and record.get("status") == "ok" and output.exists())

    def append(self, record: dict) -> None:
        record = {**self.run_fields, **record}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a+b") as f:
            f.seek(0, os.SEEK_END)
            if f.tell():  # after a line a crash cut short, start a new one
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
            f.write(json.dumps(record).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        self.records[record["input"]] = record
