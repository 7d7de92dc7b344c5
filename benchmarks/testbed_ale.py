"""ALE on the trained testbed editor: attribute leakage of recolour edits with and without it.

    python -m benchmarks.testbed_ale --edits 64

Edits held-out scenes (recolour one object of two or three; two objects of three) without ALE
and with ALE and each of its ablations (same seeds; the objects' exact masks), and writes
``testbed-ale-<device>-<date>.json`` (summaries and per-edit rows) and ``.png`` (rows: source |
target | no ALE | each variant) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from benchmarks.results import save_with_figure
from ditflow.methods.ale import ALEConfig
from ditflow.testbed.evaluate import attribute_leakage
from ditflow.testbed.models import testbed_pipeline

VARIANTS = {
    "ale": ALEConfig(),
    "no-ore": ALEConfig(restrict_embeddings=False),
    "no-rgb-cam": ALEConfig(mask_attention=False),
    "no-blending": ALEConfig(blend_background=False),
}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edits", type=int, default=64, help="held-out edits of each kind")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    pipeline = testbed_pipeline("editor")
    pipeline.set_progress_bar_config(disable=True)
    result = attribute_leakage(pipeline, VARIANTS, args.edits, args.steps)
    print(json.dumps(result["summary"], indent=1))
    save_with_figure(args.out, "testbed-ale", "testbed_ale", argv,
                     variants={name: vars(config) for name, config in VARIANTS.items()},
                     **result)


if __name__ == "__main__":
    main()
