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
    """``DITFLOW_COMMIT`` where set (a copy of the checkout may carry a stale .git), else git's."""
    if os.environ.get("DITFLOW_COMMIT"):
        return os.environ["DITFLOW_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


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


class ResultsFile:
    """One results file, ``<out>/<kind>-<device>-<date>.json``, rewritten whole by each
    :meth:`write`: a script writes after every finished unit, so a run cut short (a timeout, a
    crash) keeps what it finished. The metadata (and so the name) is taken once, at the start."""

    def __init__(self, out: Path, kind: str, module: str, argv: list[str]):
        self.meta = metadata(module, argv)
        slug = self.meta["device"].replace(" ", "-")
        self.path = out / f"{kind}-{slug}-{self.meta['date'][:10]}.json"

    def write(self, **payload) -> Path:
        """Replace the file with the metadata and ``payload``; through a temporary file, so a
        run killed while writing leaves the previous version, not a truncated one."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(json.dumps(dict(meta=self.meta, **payload), indent=1))
        partial.replace(self.path)
        print(f"wrote {self.path}", flush=True)
        return self.path


def save(out: Path, kind: str, module: str, argv: list[str], **payload) -> Path:
    """Write ``<out>/<kind>-<device>-<date>.json`` holding the metadata and ``payload``."""
    return ResultsFile(out, kind, module, argv).write(**payload)


def failure_note(exc: BaseException) -> str:
    """What a results row records for a failed measurement: "OOM", or the exception's type and
    first line, short enough for a table cell."""
    if isinstance(exc, torch.OutOfMemoryError):
        return "OOM"
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"


def save_with_figure(out: Path, kind: str, module: str, argv: list[str], figure, **payload
                     ) -> Path:
    """:func:`save`, and ``figure`` (uint8 [H, W, 3]) beside it as ``.png``."""
    from PIL import Image

    path = save(out, kind, module, argv, **payload)
    Image.fromarray(figure).save(path.with_suffix(".png"))
    print(f"wrote {path.with_suffix('.png')}")
    return path
