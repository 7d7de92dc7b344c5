"""Efficacy on the trained testbed: edit accuracy, context use, and what DeContext does.

    python -m benchmarks.testbed_efficacy --edits 32 --protect 8 --steps 800
    python -m benchmarks.testbed_efficacy --model t2i --edits 32

The editor run writes ``testbed-efficacy-<device>-<date>.json`` (summaries and per-edit rows) and
``testbed-efficacy-<device>-<date>.png`` (rows: clean context | protected context | edit of clean |
edit of protected) under ``--out``; the t2i run writes ``testbed-t2i-<device>-<date>.json`` and
``.png`` (caption accuracy on held-out scenes; rows: scene | generation).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image

from benchmarks.results import save
from ditflow.methods.decontext import ProtectConfig
from ditflow.testbed.evaluate import edit_quality, generation_quality, protection_efficacy
from ditflow.testbed.models import testbed_pipeline

ATTACKED = ("single.0", "single.1", "single.2")  # the front two thirds, as DeContext's 0..25/38


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["editor", "t2i"], default="editor")
    parser.add_argument("--edits", type=int, default=32,
                        help="held-out edits (captions, for t2i) for accuracy")
    parser.add_argument("--protect", type=int, default=16, help="held-out contexts to protect")
    parser.add_argument("--steps", type=int, default=800, help="PGD steps")
    parser.add_argument("--epsilon", type=float, default=12.75)
    parser.add_argument("--edit-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16, help="contexts protected together")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.model == "t2i":
        return t2i(args, argv)
    pipeline = testbed_pipeline("editor")
    quality = edit_quality(pipeline, args.edits, args.edit_steps)
    print("edit quality:", json.dumps(quality["summary"], indent=1), flush=True)
    config = ProtectConfig(steps=args.steps, epsilon=args.epsilon, resolution=32,
                           blocks=ATTACKED, max_sequence_length=24,
                           batch_size=args.batch_size)
    efficacy = protection_efficacy(pipeline, config, args.protect, args.edit_steps)
    print("protection:", json.dumps(efficacy["summary"], indent=1), flush=True)
    path = save(args.out, "testbed-efficacy", "testbed_efficacy", argv,
                attacked_blocks=list(ATTACKED), edit_quality=quality,
                protection={k: v for k, v in efficacy.items() if k != "figure"})
    figure = path.with_suffix(".png")
    Image.fromarray(efficacy["figure"]).save(figure)
    print(f"wrote {figure}")


def t2i(args, argv) -> None:
    quality = generation_quality(testbed_pipeline("t2i"), args.edits, args.edit_steps)
    print("generation quality:", json.dumps(quality["summary"], indent=1), flush=True)
    figure = quality.pop("figure")
    path = save(args.out, "testbed-t2i", "testbed_efficacy", argv, generation_quality=quality)
    Image.fromarray(figure).save(path.with_suffix(".png"))
    print(f"wrote {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
