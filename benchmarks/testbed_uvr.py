"""UVR on the trained testbed models: a colour as the stand-in unsafe concept.

    python -m benchmarks.testbed_uvr --prompts 64

Collects anchors for the concept (default purple: its pixels, detected by colour, select the
anchor tokens) from the text-to-image model and from the editor, then generates held-out
captions and edits held-out contexts with and without the concept, with and without UVR (same
seeds), and writes ``testbed-uvr-<device>-<date>.json`` (summaries and per-prompt rows) and
``.png`` (rows: scene or context | no UVR | each variant) under ``--out``. Variants: the
default threshold (0.6) and a stricter one (1.0). The testbed has 4 single blocks; UVR
localises at single.1, the same depth as FLUX.1's single.10 of 38.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from benchmarks.results import save_with_figure
from ditflow.methods.uvr import UVRConfig
from ditflow.testbed.evaluate import concept_removal
from ditflow.testbed.models import testbed_pipeline

VARIANTS = {
    "uvr": UVRConfig(block="single.1"),
    "uvr-threshold-1.0": UVRConfig(block="single.1", threshold=1.0),
}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64,
                        help="held-out captions / contexts per set")
    parser.add_argument("--anchors", type=int, default=16, help="anchor prompts per task")
    parser.add_argument("--concept", default="purple", help="the colour standing in")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    t2i, editor = testbed_pipeline("t2i"), testbed_pipeline("editor")
    for pipeline in (t2i, editor):
        pipeline.set_progress_bar_config(disable=True)
    result = concept_removal(t2i, editor, VARIANTS, args.prompts, args.anchors, args.steps,
                             args.concept)
    print(json.dumps(result["summary"], indent=1))
    save_with_figure(args.out, "testbed-uvr", "testbed_uvr", argv, concept=args.concept,
                     variants={name: asdict(config) for name, config in VARIANTS.items()},
                     **result)


if __name__ == "__main__":
    main()
