"""Efficacy on the trained testbed: edit accuracy, context use, and what DeContext does.

    python -m benchmarks.testbed_efficacy --edits 32 --protect 12 --steps 800 --epsilon 12.75 32
    python -m benchmarks.testbed_efficacy --model t2i --edits 32

The editor run protects with the testbed's own instruction pool (``--method diff-pgd``: the
baseline, files named ``testbed-efficacy-diff-pgd-...``) and writes
``testbed-efficacy-<device>-<date>.json`` (summaries and per-edit rows, per epsilon) and
``testbed-efficacy-<device>-<date>-eps<epsilon>.png`` (rows: clean context | protected context |
edit of clean | edit of protected) under ``--out``; the t2i run writes
``testbed-t2i-<device>-<date>.json`` and ``.png`` (caption accuracy on held-out scenes; rows:
scene | generation).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image

from benchmarks.results import save, save_with_figure
from ditflow.methods.decontext import ProtectConfig
from ditflow.models.presets import protect_defaults
from ditflow.testbed.evaluate import (
    edit_quality,
    generation_quality,
    protection_efficacy,
    r_ctx_by_content,
)
from ditflow.testbed.models import testbed_pipeline

TESTBED = protect_defaults("testbed")  # as `ditflow protect --model testbed`


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["editor", "t2i"], default="editor")
    parser.add_argument("--edits", type=int, default=32,
                        help="held-out edits (captions, for t2i) for accuracy")
    parser.add_argument("--protect", type=int, default=16, help="held-out contexts to protect")
    parser.add_argument("--steps", type=int, default=800, help="PGD steps")
    parser.add_argument("--epsilon", type=float, nargs="+", default=[12.75],
                        help="budgets to protect at, 0..255 units; the step is epsilon / 20 "
                             "(the authors' 0.6375 at 12.75)")
    parser.add_argument("--method", choices=["decontext", "diff-pgd"], default="decontext",
                        help="the protection to measure (diff-pgd: the baseline)")
    parser.add_argument("--edit-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16, help="contexts protected together")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.model == "t2i":
        return t2i(args, argv)
    pipeline = testbed_pipeline("editor")
    pipeline.set_progress_bar_config(disable=True)
    quality = edit_quality(pipeline, args.edits, args.edit_steps)
    print("edit quality:", json.dumps(quality["summary"], indent=1), flush=True)
    protection, figures = [], []
    probe_config = ProtectConfig(**TESTBED)
    by_content = r_ctx_by_content(pipeline, probe_config, args.protect)
    print("r_ctx by context content:", json.dumps(by_content, indent=1), flush=True)
    for epsilon in args.epsilon:
        config = ProtectConfig(steps=args.steps, epsilon=epsilon, step_size=epsilon / 20,
                               **TESTBED, batch_size=args.batch_size,
                               method=args.method)
        efficacy = protection_efficacy(pipeline, config, args.protect, args.edit_steps)
        print(f"protection at epsilon {epsilon}:", json.dumps(efficacy["summary"], indent=1),
              flush=True)
        figures.append(efficacy.pop("figure"))
        protection.append(dict(epsilon=epsilon, step_size=config.step_size, **efficacy))
    name = "testbed-efficacy" if args.method == "decontext" else f"testbed-efficacy-{args.method}"
    path = save(args.out, name, "testbed_efficacy", argv, method=args.method,
                attacked_blocks=list(TESTBED["blocks"]), edit_quality=quality,
                r_ctx_by_content=by_content, protection=protection)
    for epsilon, figure in zip(args.epsilon, figures, strict=True):
        figure_path = path.with_name(f"{path.stem}-eps{epsilon:g}.png")
        Image.fromarray(figure).save(figure_path)
        print(f"wrote {figure_path}")


def t2i(args, argv) -> None:
    pipeline = testbed_pipeline("t2i")
    pipeline.set_progress_bar_config(disable=True)
    quality = generation_quality(pipeline, args.edits, args.edit_steps)
    print("generation quality:", json.dumps(quality["summary"], indent=1), flush=True)
    figure = quality.pop("figure")
    save_with_figure(args.out, "testbed-t2i", "testbed_efficacy", argv, figure,
                     generation_quality=quality)


if __name__ == "__main__":
    main()
