"""Overhead of an always-on intervention on a 28-step FLUX.1 generation at 1024².

    python -m benchmarks.generation --out benchmarks/results
    python -m benchmarks.generation --model tiny --size 32 --steps 2   # the script, on a CPU

Full-size FLUX.1 architecture with random weights (timing does not depend on the weights, but
needs a GPU), random prompt embeddings instead of the text encoders; ``--model tiny`` is the
random tiny FLUX pipeline, which runs anywhere. Providers: stock diffusers (SDPA); ditflow
attached with nothing active (every block takes the processors' plain-attention path: what an
intervention costs in the blocks and steps it leaves alone); ditflow attached with rules in
every block and step (text -> image logits x1.2, image -> image
probabilities x0.9); ditflow attached with per-group mass recorded in every block; UVR with
random anchors and every token flagged (the most it can cost: noise in every block of the
start-up steps); DeLeaker with two entities (text tokens 1-2 and 4-5; regions from the
attention, pair masks in every edited block), the slowest, last. Writes
``generation-<device>-<date>.json``, rewritten after every provider, so a run cut short keeps
what it finished; a provider that fails is recorded as NaN with a note. ``--profile`` adds one
profiled generation per provider: its device time by kernel class and its top kernels (a wall
time above the device time is time the GPU waited on the host).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from benchmarks.protect_step import full_size_models
from benchmarks.results import ResultsFile, failure_note
from benchmarks.timing import device_time_profile
from ditflow.layout import TARGET, TEXT
from ditflow.methods.deleaker import DeLeaker
from ditflow.methods.uvr import UVR, UVRConfig
from ditflow.session import Intervention, StatsRecorder, attach


class AlwaysOnRules(Intervention):
    def rules(self, step, block, layout):
        return (layout.rules().scale_logits(TARGET, TEXT, 1.2)
                .weight_probs(TARGET, TARGET, 0.9))


def _pipeline_and_prompt(model: str) -> tuple[object, dict]:
    """A FluxPipeline and the prompt arguments of its calls."""
    if model == "tiny":
        from ditflow.tiny import tiny_flux_pipeline

        return tiny_flux_pipeline("t2i"), dict(prompt="a red circle", max_sequence_length=8)
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    transformer, vae = full_size_models()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                        transformer=transformer)
    return pipe, dict(
        prompt_embeds=torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16),
        pooled_prompt_embeds=torch.randn(1, 768, device="cuda", dtype=torch.bfloat16))


def main(argv=None) -> Path:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["full", "tiny"], default="full")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true",
                        help="also profile one generation per provider: its device time by "
                             "kernel class and its top kernels, in the row's \"profile\"")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    results = ResultsFile(args.out, "generation", "generation", argv)
    pipe, prompt = _pipeline_and_prompt(args.model)
    pipe.set_progress_bar_config(disable=True)
    device = pipe.transformer.device

    def generate():
        with torch.no_grad():
            pipe(**prompt, height=args.size, width=args.size, num_inference_steps=args.steps,
                 output_type="latent", generator=torch.Generator(device).manual_seed(0))
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(context_factory):
        times = []
        for repeat in range(args.repeats + 1):  # the first run warms up
            with context_factory():
                start = time.perf_counter()
                generate()
                if repeat:
                    times.append(time.perf_counter() - start)
        return statistics.median(times)

    patch = pipe.vae_scale_factor * 2
    config = pipe.transformer.config

    def deleaker():
        return attach(pipe, DeLeaker([[1, 2], [4, 5]], (args.size // patch, args.size // patch),
                                     config.num_layers + config.num_single_layers))

    def uvr():
        grid = (args.size // patch, args.size // patch)
        block = f"single.{min(10, config.num_single_layers - 1)}"  # FLUX.1's single.10
        heads, dim = config.num_attention_heads, config.attention_head_dim
        anchors = torch.randn(4, heads, dim, generator=torch.Generator().manual_seed(0))
        return attach(pipe, UVR(anchors, grid, "generate",
                                UVRConfig(block=block, threshold=float("-inf"))))

    rows = []
    for name, factory in (
        ("stock diffusers (SDPA)", nullcontext),
        ("ditflow, attached with nothing active", lambda: attach(pipe, Intervention())),
        ("ditflow, rules in every block and step", lambda: attach(pipe, AlwaysOnRules())),
        ("ditflow, mass recorded in every block", lambda: attach(pipe, StatsRecorder())),
        ("ditflow, UVR (every token flagged)", uvr),
        ("ditflow, DeLeaker (2 entities)", deleaker),  # the slowest, last
    ):
        row = dict(model=args.model, provider=name, seconds=math.nan, size=args.size,
                   steps=args.steps)
        try:
            row["seconds"] = timed(factory)
            if args.profile:
                with factory():
                    row["profile"] = device_time_profile(generate, device)
        except Exception as exc:  # OOM, a kernel that cannot compile, a CUDA error
            row["note"] = failure_note(exc)
        stock = rows[0] if rows else row  # the first provider, stock diffusers
        row["overhead"] = row["seconds"] / stock["seconds"] - 1
        rows.append(row)
        print(row, flush=True)
        results.write(rows=rows)
    return results.path


if __name__ == "__main__":
    main()
