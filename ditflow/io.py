"""Photos in and out: loading (EXIF orientation, ICC, alpha, 16-bit, CMYK, palettes), lossless
atomic saving, budget-exact quantisation, quality metrics, and the JSONL manifest of a run."""

from __future__ import annotations

import io
import json
import math
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

MIN_SIDE = 16
DEFAULT_MAX_PIXELS = 64_000_000


class ImageError(Exception):
    """A photo that cannot be processed; the message says why and what to do."""


@dataclass
class Photo:
    """A loaded photo. ``pixels``: uint8 [H, W, 3] RGB after EXIF orientation; ``alpha``:
    uint8 [H, W] or None; ``icc``: the embedded colour profile (kept on save) or None;
    ``note``: what loading changed that the output cannot keep (frames, bit depth, CMYK, a
    profile dropped), for the manifest; "" if nothing."""

    pixels: np.ndarray
    alpha: np.ndarray | None
    icc: bytes | None
    note: str = ""

    def tensor(self) -> torch.Tensor:
        """float [3, H, W] in [0, 1]."""
        return pixels_tensor(self.pixels)


def folder_files(folder: Path) -> list[Path]:
    """The files of ``folder`` that commands take for photos, sorted: not recursive, and not
    hidden ones (``.DS_Store``, macOS's ``._IMG_0001.jpg``), which file browsers leave there."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def load_photo(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Photo:
    """Load a photo for protection, or raise :class:`ImageError` naming the problem."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: " + ("a folder, not a photo" if path.is_dir()
                                         else "no such file"))
    old_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # checked below against max_pixels itself, before decoding
    try:
        image = Image.open(path)  # reads the header only
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError(f"{path}: {width}x{height} = {width * height} pixels, over the "
                             f"limit of {max_pixels} (the decompression-bomb guard; raise "
                             "--max-pixels if the photo is genuine)")
        decoder_args = image.tile[0][3] if image.tile else ""  # gone once loaded
        image.load()
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{path}: corrupt or truncated image ({exc})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = old_limit
    notes = []
    frames = getattr(image, "n_frames", 1)
    if frames > 1 and image.format != "MPO":  # (a camera JPEG's second picture is a preview)
        notes.append(f"first of {frames} frames protected")
    if decoder_args == "RGB;16B":  # a 16-bit RGB PNG, which Pillow reads as 8-bit RGB
        notes.append("16-bit input written as 8-bit")
    icc = image.info.get("icc_profile")
    with image:  # closes the file, which Pillow keeps open for a multi-frame image's frames
        image = ImageOps.exif_transpose(image)  # a copy
    if image.width < MIN_SIDE or image.height < MIN_SIDE:
        raise ImageError(f"{path}: {image.width}x{image.height} is too small (at least "
                         f"{MIN_SIDE} px per side)")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        image, note = _to_8bit(image)
        notes.append(note)
    if image.mode == "CMYK":
        image = image.convert("RGB")
        notes.append("CMYK converted to RGB")
    if icc and icc[16:20] != b"RGB ":  # the profile's colour space: it would not describe RGB
        notes.append(f"its {icc[16:20].decode('latin-1').strip()} colour profile dropped "
                     "(the output is RGB)")
        icc = None
    alpha = None
    if image.mode == "PA" or "transparency" in image.info:  # a palette or colour-key alpha
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        alpha = np.asarray(image.getchannel("A")).copy()
    if image.mode not in ("RGB",):
        image = image.convert("RGB")
    return Photo(np.asarray(image).copy(), alpha, icc, "; ".join(notes))


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


def pixels_tensor(image, name: str = "image") -> torch.Tensor:
    """A PIL image, uint8 array [H, W, 3] or float tensor [3, H, W] in [0, 1] -> float
    [3, H, W] in [0, 1]; ``name`` names the image in errors."""
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3 or not image.is_floating_point():
            raise ValueError(f"{name}: a tensor of shape {tuple(image.shape)} and dtype "
                             f"{image.dtype}; expected float [3, H, W] in [0, 1]")
        low, high = (float(v) for v in image.aminmax()) if image.numel() else (0.0, 0.0)
        if not (low >= 0 and high <= 1):  # NaN fails too
            raise ValueError(f"{name}: values from {low:.4g} to {high:.4g}; expected [0, 1] "
                             "(8-bit pixels divided by 255)")
        return image.float()
    array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"{name}: an array of shape {array.shape} and dtype {array.dtype}; "
                         "expected uint8 [H, W, 3]")
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255


def to_uint8(image: np.ndarray) -> np.ndarray:
    """A pipeline's float image in [0, 1] (``output_type="np"``, [H, W, 3]) as uint8."""
    return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)


def resize_pixels(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Float ``[3, H, W]`` or ``[B, 3, H, W]`` in [0, 1] at ``size`` (h, w): bilinear with
    antialiasing (a downscale averages its pixels instead of aliasing), clamped to [0, 1];
    returned as is when already that size."""
    if tuple(pixels.shape[-2:]) == tuple(size):
        return pixels
    batch = pixels if pixels.dim() == 4 else pixels[None]
    resized = torch.nn.functional.interpolate(batch.float(), size=tuple(size), mode="bilinear",
                                              antialias=True, align_corners=False).clamp(0, 1)
    return resized if pixels.dim() == 4 else resized[0]


def to_pil(pixels: torch.Tensor):
    """A float ``[3, H, W]`` image in [0, 1] as an RGB PIL image (rounded as :func:`to_uint8`)."""
    from PIL import Image

    return Image.fromarray(to_uint8(pixels.detach().float().permute(1, 2, 0).cpu().numpy()))


def quantize_within_budget(original: np.ndarray, protected: torch.Tensor, epsilon: float
                           ) -> np.ndarray:
    """uint8 [H, W, 3] from a float [3, H, W] result, with |protected - original| <= epsilon
    holding exactly after rounding (epsilon in 0..255 units)."""
    budget = math.floor(epsilon + 1e-9)
    values = np.rint(protected.clamp(0, 1).permute(1, 2, 0).numpy() * 255)
    low = original.astype(np.int16) - budget
    high = original.astype(np.int16) + budget
    return np.clip(values, np.maximum(low, 0), np.minimum(high, 255)).astype(np.uint8)


JPEG_QUALITY = 95  # and no chroma subsampling: a JPEG output stays close to the protected pixels


def encode_photo(pixels: np.ndarray, alpha: np.ndarray | None = None, icc: bytes | None = None,
                 jpeg: bool = False) -> bytes:
    """The file bytes of a photo: PNG (lossless) or JPEG. Alpha and ICC kept (JPEG drops
    alpha)."""
    from PIL import Image

    image = Image.fromarray(pixels)
    if alpha is not None and not jpeg:
        image.putalpha(Image.fromarray(alpha))
    options = {"icc_profile": icc} if icc else {}
    if jpeg:
        options.update(quality=JPEG_QUALITY, subsampling=0)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG" if jpeg else "PNG", **options)
    return buffer.getvalue()


def decode_pixels(data: bytes) -> np.ndarray:
    """uint8 [H, W, 3] RGB of encoded photo bytes: what a reader of the saved file sees."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).copy()


def is_jpeg(path: Path) -> bool:
    return path.suffix.lower() in (".jpg", ".jpeg")


def write_file(path: Path, data: bytes) -> None:
    """Write through a temporary file in the same folder, then rename: a crash never leaves a
    half-written file under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # not named after the photo: a name near the 255-byte limit would leave no room
    tmp = path.with_name(f".ditflow-{secrets.token_hex(4)}.tmp")
    # created as any new file is (0666 less the umask), not private like mkstemp's
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_photo(path: Path, pixels: np.ndarray) -> None:
    """Save uint8 [H, W, 3] atomically; PNG unless the suffix asks for JPEG."""
    write_file(path, encode_photo(pixels, jpeg=is_jpeg(path)))


def linf(a: np.ndarray, b: np.ndarray) -> int:
    """Largest absolute difference of two uint8 images."""
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max(initial=0))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    diff = a.astype(np.float32) - b.astype(np.float32)  # squares exact, half float64's memory
    mse = float(np.mean(np.square(diff), dtype=np.float64))
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


SSIM_BAND_ROWS = 128  # rows per band: a 64 MP photo's SSIM in about 100 MB


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM over RGB channels (Gaussian window 11, sigma 1.5; Wang et al. 2004; images
    thinner than 11 px get a window as wide as they are). The window is separable: blurred
    along rows then columns as weighted sums of shifted views, over bands of rows."""
    size = min(11, *a.shape[:2])
    coords = np.arange(size) - (size - 1) / 2
    g = np.exp(-(coords**2) / (2 * 1.5**2))
    g /= g.sum()

    def blur(t):
        down = sum(w * t[i:i + t.shape[0] - size + 1] for i, w in enumerate(g))
        return sum(w * down[:, i:i + down.shape[1] - size + 1] for i, w in enumerate(g))

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    rows = a.shape[0] - size + 1  # of the valid (unpadded) SSIM map
    total = 0.0
    for start in range(0, rows, SSIM_BAND_ROWS):
        stop = min(start + SSIM_BAND_ROWS, rows) + size - 1
        x, y = a[start:stop].astype(np.float64), b[start:stop].astype(np.float64)
        mx, my = blur(x), blur(y)
        vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
        value = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
        total += float(value.sum())
    return total / (3 * rows * (a.shape[1] - size + 1))


def to_json(record, indent: int | None = None) -> str:
    """``record`` as standard JSON: infinite or NaN numbers (the PSNR of identical images) as
    null, which every JSON reader accepts."""
    def finite(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {key: finite(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(item) for item in value]
        return value

    return json.dumps(finite(record), indent=indent, allow_nan=False)


class Manifest:
    """JSONL record of a run, appended and flushed line by line, so a crash loses nothing that
    was done: per photo, a ``started`` line naming its output before it is written (so a resume
    knows the file for ditflow's even if the crash came before the last line) and a line when
    it is done. ``run_fields`` go into every appended record. Outputs are known by file name:
    they live in the manifest's folder, wherever the run is started from."""

    def __init__(self, path: Path, run_fields: dict | None = None):
        self.path = path
        self.run_fields = run_fields or {}
        self.records: dict[str, dict] = {}
        self._protected_from: dict[str, Path] = {}  # output file name -> its input photo
        if path.exists():
            for line in path.read_text(errors="replace").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a crash: that photo is simply redone
                if isinstance(record, dict) and "input" in record:
                    self._note(record)

    def _note(self, record: dict) -> None:
        self.records[record["input"]] = record
        if record.get("status") in ("started", "ok"):  # a crash may come between the two
            self._protected_from[Path(record["output"]).name] = Path(record["input"])

    def output_names(self) -> list[str]:
        """The file names of every output the manifest records (started or finished)."""
        return list(self._protected_from)

    def protected_from(self, output: Path) -> Path | None:
        """The input photo whose protection the manifest records in ``output``, if any."""
        return self._protected_from.get(output.name)

    def finished(self, source: Path, output: Path) -> bool:
        """Whether ``source`` was protected into ``output`` (by name) and that file is there."""
        record = self.records.get(str(source.resolve()))
        return bool(record and record.get("status") == "ok"
                    and Path(record["output"]).name == output.name and output.exists())

    def append(self, record: dict) -> None:
        record = {**self.run_fields, **record}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a+b") as f:
            f.seek(0, os.SEEK_END)
            if f.tell():  # after a line a crash cut short, start a new one
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
            f.write(to_json(record).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        self._note(record)
