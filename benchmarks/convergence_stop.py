"""How many steps the optional convergence stop saves, and the r_ctx it reaches, against the
full schedule, on the bundled sample photos.

    python -m benchmarks.convergence_stop --model tiny --steps 800 --window 50 --min-gain 0.002

Writes ``convergence-stop-<model>-<date>.json`` under ``--out``, with r_ctx of contexts without
content (``ditflow.testbed.evaluate.r_ctx_by_content``) and the context's share of the keys
beside it: how far r_ctx can fall depends on how much of it the photo's content sets. On the
random tiny model the numbers describe the machinery only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from benchmarks.results import save
from ditflow.cli import SAMPLES
from ditflow.io import load_photo
from ditflow.methods.decontext import ProtectConfig, Protector, iter_protect
from ditflow.models.loading import pipeline_by_name
from ditflow.models.presets import BUILTIN, protect_defaults
from ditflow.testbed.evaluate import r_ctx_by_content
from ditflow.testbed.scenes import SIZE


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--window", type=int, default=50)
    parser.add_argument("--min-gain", type=float, default=0.002)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    base = dict(steps=args.steps, **protect_defaults(args.model))  # as `ditflow protect`
    pipeline = pipeline_by_name(args.model, args.device)
    photos = [(p.name, load_photo(p).tensor()) for p in sorted(SAMPLES.glob("*.png"))]
    probe = ProtectConfig(**base)
    by_content = r_ctx_by_content(pipeline, probe)
    tokens = (SIZE // Protector(pipeline, probe).calls.multiple) ** 2  # the probe's contexts: SIZE²
    context_share = tokens / (probe.max_sequence_length + 2 * tokens)
    print("r_ctx by context content:", by_content, "context share of keys:", context_share)
    rows = []
    for label, extra in (("full schedule", {}),
                         ("convergence stop", dict(stop_window=args.window,
                                                   stop_min_gain=args.min_gain))):
        for result in iter_protect(photos, pipeline, ProtectConfig(**base, **extra)):
            rows.append(dict(run=label, photo=result.name, steps=result.steps,
                             r_ctx_before=result.r_ctx_before, r_ctx_after=result.r_ctx_after,
                             seconds=result.seconds))
            print(rows[-1], flush=True)
    save(args.out, f"convergence-stop-{args.model if args.model in BUILTIN else 'model'}",
         "convergence_stop", argv, rows=rows, r_ctx_by_content=by_content,
         context_share_of_keys=context_share)


if __name__ == "__main__":
    main()
