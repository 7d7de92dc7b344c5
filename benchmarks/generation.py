"""GPU: overhead of an always-on intervention on a 28-step FLUX.1 generation at 1024².

    python -m benchmarks.generation --out benchmarks/results

Full-size FLUX.1 architecture with random weights (timing does not depend on the weights),
random prompt embeddings instead of the text encoders. Providers: stock diffusers (SDPA); ditflow
attached with rules in every block and step (text -> image logits x1.2, image -> image
probabilities x0.9); ditflow attached with per-group mass recorded in every block. Writes
``generation-<device>-<date>.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from benchmarks.protect_step import full_size_models
from benchmarks.results import save
from ditflow.layout import TARGET, TEXT
from ditflow.session import Intervention, StatsRecorder, attach


class AlwaysOnRules(Intervention):
    def rules(self, step, block, layout):
        return (layout.rules().scale_logits(TARGET, TEXT, 1.2)
                .weight_probs(TARGET, TARGET, 0.9))


def main(argv=None) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    transformer, vae = full_size_models()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                        transformer=transformer)
    embeds = torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16)
    pooled = torch.randn(1, 768, device="cuda", dtype=torch.bfloat16)

    def generate():
        with torch.no_grad():
            pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=args.size,
                 width=args.size, num_inference_steps=args.steps, output_type="latent",
                 generator=torch.Generator("cuda").manual_seed(0))
        torch.cuda.synchronize()

    def timed(context_factory):
        times = []
        for repeat in range(args.repeats + 1):  # the first run warms up
            with context_factory():
                start = time.perf_counter()
                generate()
                if repeat:
                    times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    from contextlib import nullcontext

    rows = []
    for name, factory in (
        ("stock diffusers (SDPA)", nullcontext),
        ("ditflow, rules in every block and step", lambda: attach(pipe, AlwaysOnRules())),
        ("ditflow, mass recorded in every block", lambda: attach(pipe, StatsRecorder())),
    ):
        seconds = timed(factory)
        rows.append(dict(provider=name, seconds=seconds, size=args.size, steps=args.steps))
        print(rows[-1], flush=True)
    base = rows[0]["seconds"]
    for row in rows:
        row["overhead"] = row["seconds"] / base - 1
    save(args.out, "generation", "generation", argv, rows=rows)


if __name__ == "__main__":
    main()
