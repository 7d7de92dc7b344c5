"""Where benchmark results go: one JSON file per run with the provenance every result needs
(device, versions, git commit, date, the exact command)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

import torch


def _git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("DITFLOW_COMMIT", "unknown")


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def metadata(module: str, argv: list[str]) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return dict(
        device=device_name(),
        torch=torch.__version__,
        triton=triton_version,
        cuda=torch.version.cuda,
        python=platform.python_version(),
        commit=_git_commit(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=f"python -m benchmarks.{module} " + " ".join(argv),
    )


def save(out: Path, kind: str, module: str, argv: list[str], **payload) -> Path:
    """Write ``<out>/<kind>-<device>-<date>.json`` holding the metadata and ``payload``."""
    meta = metadata(module, argv)
    slug = meta["device"].replace(" ", "-")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{kind}-{slug}-{meta['date'][:10]}.json"
    path.write_text(json.dumps(dict(meta=meta, **payload), indent=1))
    print(f"wrote {path}")
    return path


def save_with_figure(out: Path, kind: str, module: str, argv: list[str], figure, **payload
                     ) -> Path:
    """:func:`save`, and ``figure`` (uint8 [H, W, 3]) beside it as ``.png``."""
    from PIL import Image

    path = save(out, kind, module, argv, **payload)
    Image.fromarray(figure).save(path.with_suffix(".png"))
    print(f"wrote {path.with_suffix('.png')}")
    return path
