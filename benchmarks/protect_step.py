"""One DeContext PGD step on the full-size FLUX.1 Kontext, Step1X-Edit or Qwen-Image-Edit
architecture (random weights).

    python -m benchmarks.protect_step --resolution 512 1024 --out benchmarks/results
    python -m benchmarks.protect_step --model step1x --resolution 512 1024
    python -m benchmarks.protect_step --model qwen-edit --resolution 512 1024
    python -m benchmarks.protect_step --model tiny --resolution 32   # the script itself, on a CPU
    python -m benchmarks.protect_step --model host --resolution 64 --rows ditflow recipe

ditflow's step: forward through the last attacked block only (early stop: FLUX.1 Kontext's and
Step1X-Edit's single block 25, Qwen-Image-Edit's block 39), r_ctx from the fused kernel's mass,
backward through its mass gradient; the same with the transformer's blocks compiled (diffusers'
regional compilation, ``compile_repeated_blocks``: each block class compiled once; ditflow's
session hooks run between the compiled pieces); the same replayed from a CUDA graph
(``--cuda-graph``; with and without compiled blocks; on a GPU, not for Qwen-Image-Edit); the
same over ``--batch`` photos, timed per photo (what bulk protection with ``--batch-size`` gets:
the host's work per step is shared by the batch). The authors' recipe (FLUX.1 Kontext and
Step1X-Edit; the "eager recipe" on Qwen-Image-Edit): all blocks, softmax probabilities of the
target queries over all keys materialised in every attacked block, gradient checkpointing. Both
differentiate r_ctx with respect to the photo's pixels through the VAE encoder. Random text
embeddings stand in for the text encoders (computed once per prompt in real runs, so outside
the step). Steps are timed chained as a protection run chains them (``--chain`` steps per run,
each starting from the last one's photos, nothing read back in between), per step, the median
of three runs after a warm-up (which compiles, in the compiled row).

``--profile`` profiles one more run per row: where a step's device time goes (ditflow's
attention, matrix products, convolutions, compiled kernels, the rest) and its top kernels, per
step (per photo in the batched row, as its times).

Writes ``protect-step-<model>-<device>-<date>.json`` (``<model>``: the ``--model`` argument),
rewritten after every row, so a run cut short keeps what it finished; a row that fails (OOM, a
kernel that cannot compile, a CUDA error) is recorded as NaN with a note. The full-size models
need a GPU; ``--model tiny``, ``tiny-qwen`` and ``tiny-step1x`` (random tiny models, two blocks
attacked) run on any device, which is how the tests keep the script working between GPU runs.

``--model host`` (on the CPU, at a small ``--resolution`` such as 64; ``host-step1x`` and
``host-qwen`` for the other editors, with 8 text tokens) runs FLUX.1 Kontext's every block and
VAE layer on almost no data: what its rows time is the host's work per step, Python and
PyTorch's dispatch. At 512² on a GPU both ditflow's step and the recipe are bound by that work,
so the ratio of these rows predicts theirs there, and changes to the host's work can be
measured without a GPU. (ditflow's attention runs its C++ kernels there, whose compute at these
sizes, about 0.1 ms per block, the rows also count.)
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.results import ResultsFile, failure_note
from benchmarks.timing import bench, device_time_profile


def _prompt_generator(prompt: str, device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(hash(prompt) % 2**31)


def kontext_editor(transformer, vae):
    """A FluxKontextPipeline around ``transformer`` and ``vae`` whose prompts are random
    embeddings of the transformer's widths (no text encoders)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline

    pipe = FluxKontextPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                               text_encoder=None, tokenizer=None, text_encoder_2=None,
                               tokenizer_2=None, transformer=transformer)
    config = transformer.config

    def encode_prompt(prompt, prompt_2=None, device=None, max_sequence_length=512):
        g = _prompt_generator(prompt, device)
        embeds = torch.randn(1, max_sequence_length, config.joint_attention_dim, device=device,
                             generator=g)
        pooled = torch.randn(1, config.pooled_projection_dim, device=device, generator=g)
        return embeds.to(transformer.dtype), pooled.to(transformer.dtype), None

    pipe.encode_prompt = encode_prompt
    return pipe


def qwen_editor(transformer, vae, text_tokens: int = 1390):
    """A QwenImageEditPipeline around ``transformer`` and ``vae`` whose prompts are random
    embeddings: ``text_tokens`` of them, by default the length Qwen2.5-VL gives a 1 MP photo
    plus an instruction."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline

    pipe = QwenImageEditPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                                 text_encoder=None, tokenizer=None, processor=None,
                                 transformer=transformer)

    def encode_prompt(prompt, image=None, device=None):
        g = _prompt_generator(prompt, device)
        embeds = torch.randn(1, text_tokens, transformer.config.joint_attention_dim,
                             device=device, generator=g)
        return embeds.to(transformer.dtype), None

    pipe.encode_prompt = encode_prompt
    return pipe


def step1x_editor(transformer, vae, max_text_tokens: int = 640):
    """A Step1XEditPipeline around ``transformer`` and ``vae`` whose prompts are random
    Qwen2.5-VL hidden states: ``max_text_tokens`` (Step1X-Edit always uses 640), the last 3/8
    of them padding (about 400 of 640 unpadded)."""
    from ditflow.models.step1x import Step1XEditPipeline

    pipe = Step1XEditPipeline(transformer=transformer, vae=vae, text_encoder=None,
                              processor=None, max_text_tokens=max_text_tokens)

    def encode_prompt(prompts, images):
        device = transformer.device
        g = _prompt_generator(prompts[0], device)
        embeds = torch.randn(len(prompts), max_text_tokens, transformer.config.llm_channels,
                             device=device, generator=g)
        kept = max_text_tokens * 5 // 8
        mask = (torch.arange(max_text_tokens, device=device) < kept).long()
        return embeds.to(transformer.dtype), mask.expand(len(prompts), -1)

    pipe.encode_prompt = encode_prompt
    return pipe


def full_size_step1x_models():
    from ditflow.models.step1x import Step1XEditTransformer

    _, vae = full_size_models(transformer=False)
    with torch.device("cuda"):
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            return Step1XEditTransformer().eval(), vae
        finally:
            torch.set_default_dtype(default)


def full_size_qwen_models():
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    with torch.device("cuda"):
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            return QwenImageTransformer2DModel().eval(), AutoencoderKLQwenImage().eval()
        finally:
            torch.set_default_dtype(default)


def full_size_models(transformer: bool = True):
    """FLUX.1 Kontext's transformer (None without ``transformer``) and VAE, random, in bf16."""
    from diffusers import FluxTransformer2DModel

    with torch.device("cuda"):
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            transformer = FluxTransformer2DModel(guidance_embeds=True).eval() if transformer \
                else None
            vae = _flux_vae(block_out_channels=(128, 256, 512, 512), norm_num_groups=32)
        finally:
            torch.set_default_dtype(default)
    return transformer, vae


def _flux_vae(block_out_channels: tuple[int, ...], norm_num_groups: int):
    """FLUX.1's VAE at the given widths (its own: 128, 256, 512, 512 in groups of 32)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=block_out_channels,
        layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=norm_num_groups,
        shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False,
        use_post_quant_conv=False).eval()


def host_models():
    """FLUX.1 Kontext's transformer and VAE at their full depth (19 double and 38 single
    blocks; four VAE levels of two layers) but a few channels wide, in float32 on the CPU: a
    step runs every operation of the full-size one, each on almost no data, so its time is
    the host's work (Python, PyTorch's dispatch and autograd), which bounds the full-size step
    at 512² on a GPU."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8], guidance_embeds=True).eval()
    return transformer, _flux_vae(block_out_channels=(8, 8, 8, 8), norm_num_groups=4)


def host_step1x_models():
    """Step1X-Edit's transformer at its full depth (FLUX.1's blocks, the two-block connector),
    a few channels wide, and :func:`host_models`' VAE: the host's work of its step."""
    from ditflow.models.step1x import Step1XEditTransformer

    _, vae = host_models()
    torch.manual_seed(0)
    transformer = Step1XEditTransformer(
        in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=16,
        num_attention_heads=2, axes_dims_rope=(4, 4, 8), llm_channels=16, connector_heads=2,
        connector_head_dim=16, pooled_dim=32).eval()
    return transformer, vae


def host_qwen_models():
    """Qwen-Image-Edit's transformer (60 blocks) and VAE (four levels of two blocks) at their
    full depth, a few channels wide: the host's work of its step."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(
        in_channels=64, out_channels=16, num_layers=60, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(8, 4, 4)).eval()
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16).eval()
    return transformer, vae


def _token_run(layout, name: str) -> slice:
    """Group ``name``'s tokens as a slice: every editor lays out each group as one run, and the
    authors' code slices (indexing by a bool mask instead bills the recipe for a backward that
    sorts: 2 of its 3.7 s at 1024²)."""
    tokens = layout.tokens(name).tolist()
    if tokens != list(range(tokens[0], tokens[-1] + 1)):
        raise ValueError(f"the {name} tokens are not one run: {layout}")
    return slice(tokens[0], tokens[-1] + 1)


def eager_step(protector, pixels, prompts, timesteps, noise):
    """The authors' recipe (for FLUX.1 Kontext; the same recipe on any editor): all blocks,
    eager probabilities of the target queries over all keys in the attacked blocks, gradient
    checkpointing left to the caller."""
    import importlib

    from ditflow.models import adapter_for

    transformer = protector.transformer
    blocks = adapter_for(transformer).blocks(transformer)
    # The module whose processors call dispatch_attention_fn (FLUX's or Qwen-Image's).
    model_module = importlib.import_module(type(blocks[0][1].attn.processor).__module__)
    x = pixels.clone().requires_grad_()
    # the VAE's own attention, as the authors' code runs it
    wide, protector.wide_vae_attention = protector.wide_vae_attention, False
    try:
        inputs = protector._inputs(x, prompts, timesteps, noise)
    finally:
        protector.wide_vae_attention = wide
    layout = protector._layout(inputs)  # cached per size: no work per step
    target, context = (_token_run(layout, name) for name in ("target", "context"))
    attacked = set(protector.config.blocks)
    ratios, current = [], [None]
    original = model_module.dispatch_attention_fn

    def probe(query, key, value, attn_mask=None, **kwargs):
        if current[0] in attacked:
            scale = query.shape[-1] ** -0.5
            scores = torch.einsum("bihd,bjhd->bhij", query[:, target], key) * scale
            if attn_mask is not None:  # Qwen-Image's text padding: bool [B, 1, 1, N]
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            ratios.append(scores.softmax(-1)[..., context].sum(-1).mean())
        return original(query, key, value, attn_mask=attn_mask, **kwargs)

    # Which block is running, set by hooks (they run again in checkpointing's recomputation, so
    # the recomputed block matches its first run).
    hooks = [block.register_forward_pre_hook(
        lambda module, inputs, name=str(block_id): current.__setitem__(0, name))
        for block_id, block in blocks]
    model_module.dispatch_attention_fn = probe
    try:
        transformer(**inputs)
        (grad,) = torch.autograd.grad(torch.stack(ratios).mean(), x)
    finally:
        model_module.dispatch_attention_fn = original
        for hook in hooks:
            hook.remove()
    return grad


def ditflow_step(protector, pixels, prompts, timesteps, noise):
    x = pixels.clone().requires_grad_()
    with protector.attached_r_ctx(x, prompts, timesteps, noise) as r_ctx:
        (grad,) = torch.autograd.grad(r_ctx.sum(), x)
    return grad


def graphed_step(protector, pixels, prompts, timesteps, noise):
    """ditflow's step replayed from a CUDA graph (``ProtectConfig.cuda_graph``; the warm-up
    run captures it). A failed capture fails the row, with its reason (a protection run goes
    on eagerly instead)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        return protector._graphed(pixels, prompts, timesteps, noise)


def pgd_steps(step, inputs, steps: int) -> torch.Tensor:
    """``steps`` PGD steps of ``step`` chained as ``Protector.run`` chains them: each step's
    photos are the last step's moved by the signed gradient and projected (the authors'
    step size and budget), nothing read back in between, so the host may queue a step while
    the GPU runs the last one. Returns the last photos."""
    from ditflow.methods.decontext import _project

    protector, clean, *draws = inputs
    eps, alpha = protector.config.epsilon / 255, protector.config.step_size / 255
    x = clean
    for _ in range(steps):
        grad = step(protector, x, *draws)
        with torch.no_grad():
            x = _project(x - alpha * grad.sign(), clean, eps)
    return x


def _pipeline(model: str):
    """The pipeline of ``model``, built once per run (the full-size models take tens of GiB).
    The tiny models go through the same random-text editors as the full-size ones."""
    if model == "tiny":
        from ditflow.tiny import tiny_flux_pipeline

        tiny = tiny_flux_pipeline("kontext")
        return kontext_editor(tiny.transformer, tiny.vae)
    if model == "tiny-qwen":
        from ditflow.tiny import tiny_qwen_edit_pipeline

        tiny = tiny_qwen_edit_pipeline()
        return qwen_editor(tiny.transformer, tiny.vae, text_tokens=24)
    if model == "tiny-step1x":
        from ditflow.tiny import tiny_step1x_edit_pipeline

        tiny = tiny_step1x_edit_pipeline()
        return step1x_editor(tiny.transformer, tiny.vae, tiny.config.max_text_tokens)
    if model == "step1x":
        return step1x_editor(*full_size_step1x_models())
    if model == "qwen-edit":
        return qwen_editor(*full_size_qwen_models())
    if model == "host":
        return kontext_editor(*host_models())
    # the host proxies: a few text tokens (the operations are the same for any length)
    if model == "host-step1x":
        return step1x_editor(*host_step1x_models(), max_text_tokens=8)
    if model == "host-qwen":
        return qwen_editor(*host_qwen_models(), text_tokens=8)
    return kontext_editor(*full_size_models())


def _config(model: str, resolution: int):
    from ditflow.methods.decontext import ProtectConfig

    if model == "tiny":
        return ProtectConfig(resolution=resolution, blocks=("single.0", "single.1"),
                             max_sequence_length=8)
    if model == "host":  # the full-size step's blocks, over a few text tokens
        return ProtectConfig(resolution=resolution, max_sequence_length=8)
    if model.startswith("host-"):  # the full-size step's blocks
        return ProtectConfig(resolution=resolution)
    if model == "tiny-qwen":
        return ProtectConfig(resolution=resolution, blocks=("double.0", "double.1"))
    if model == "tiny-step1x":
        return ProtectConfig(resolution=resolution, blocks=("single.0", "single.1"))
    return ProtectConfig(resolution=resolution)


def _step_inputs(pipe, config, photos: int = 1) -> tuple[tuple, int]:
    """The arguments of a step over ``photos`` photos at ``config.resolution`` (protector,
    pixels, prompts, timesteps, noise) and the length of the joint sequence: text, target and
    context tokens."""
    from ditflow.methods.decontext import Protector

    protector = Protector(pipe, config)
    device = protector.device
    h, w = protector.working_size(config.resolution, config.resolution)
    pixels = torch.rand(photos, 3, h, w, device=device)
    tokens, channels = protector._target_shape(pixels)
    noise = torch.randn(photos, tokens, channels, device=device)
    prompts = [config.prompts[i % len(config.prompts)] for i in range(photos)]
    timesteps = [990.0] * photos
    with torch.no_grad():
        sequence = len(protector._layout(protector._inputs(pixels, prompts, timesteps, noise)))
    return (protector, pixels, prompts, timesteps, noise), sequence


def _once(make: Callable[[], object]) -> Callable[[], object]:
    """``make``, called on first use only: later uses return its result, or raise the exception
    it raised, so a failed setup becomes the note of every row that needs it without being
    retried."""
    outcome: list = []

    def get():
        if not outcome:
            try:
                outcome.append((make(), None))
            except Exception as exc:
                # without its traceback, whose frames would hold what the setup allocated
                outcome.append((None, exc.with_traceback(None)))
        value, exc = outcome[0]
        if exc is not None:
            raise exc
        return value

    return get


ROWS = ["ditflow", "graphed", "compiled", "graphed-compiled", "checkpointing", "recipe",
        "batched"]


def main(argv=None) -> Path:
    from ditflow.methods.decontext import _checkpointing, _compiled_blocks, _frozen

    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="full",
                        choices=["full", "tiny", "qwen-edit", "tiny-qwen", "step1x",
                                 "tiny-step1x", "host", "host-step1x", "host-qwen"],
                        help="full: FLUX.1 Kontext; qwen-edit: Qwen-Image-Edit; step1x: "
                             "Step1X-Edit; host, host-step1x, host-qwen: their depth at tiny "
                             "widths, on the CPU (the step's host time)")
    parser.add_argument("--resolution", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--rows", nargs="+", choices=ROWS,
                        default=[r for r in ROWS
                                 if not r.startswith("graphed") or torch.cuda.is_available()],
                        help="which steps to time (default all; the CUDA graphs' on a GPU): "
                             "ditflow's, replayed from a CUDA graph, with compiled blocks, "
                             "both, with gradient checkpointing, the authors' recipe, "
                             "ditflow's over --batch photos (time per photo)")
    parser.add_argument("--chain", type=int, default=3,
                        help="PGD steps per timed run, chained as in a protection run "
                             "(default 3); times are per step")
    parser.add_argument("--batch", type=int, default=4,
                        help="photos per step of the batched row (default 4)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of the compiled-blocks row (aot_eager: "
                             "checks the path without generating code)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one run per row: a step's device time by kernel "
                             "class and its top kernels, in the row's \"profile\"")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    results = ResultsFile(args.out, f"protect-step-{args.model}", "protect_step", argv)
    eager = "eager recipe" if "qwen" in args.model else "authors' recipe"
    # row: (name, step, gradient checkpointing, compile backend, photos per step)
    batched = f"ditflow, {args.batch} photos per step (ms per photo)"
    providers = {"ditflow": ("ditflow (early stop, fused mass)", ditflow_step, False, None, 1),
                 "graphed": ("ditflow, CUDA graph", graphed_step, False, None, 1),
                 "compiled": ("ditflow, compiled blocks", ditflow_step, False,
                              args.compile_backend, 1),
                 "graphed-compiled": ("ditflow, CUDA graph, compiled blocks", graphed_step,
                                      False, args.compile_backend, 1),
                 "checkpointing": ("ditflow, gradient checkpointing", ditflow_step, True, None,
                                   1),
                 "recipe": (eager, eager_step, True, None, 1),
                 "batched": (batched, ditflow_step, False, None, args.batch)}
    providers = [providers[row] for row in args.rows]
    pipeline = _once(lambda: _pipeline(args.model))
    rows = []
    for resolution in args.resolution:
        # per (photos, graphed): the graphed row's Protector keeps its graph
        step_inputs = {(photos, step is graphed_step): _once(
            lambda r=resolution, n=photos, g=step is graphed_step: _step_inputs(
                pipeline(), replace(_config(args.model, r), cuda_graph=g), n))
            for _, step, *_, photos in providers}
        for name, step, checkpointing, backend, photos in providers:
            row = dict(model=args.model, resolution=resolution, tokens=None, provider=name)
            try:
                pipe = pipeline()
                inputs, row["tokens"] = step_inputs[(photos, step is graphed_step)]()
                with _frozen(pipe.transformer, pipe.vae), \
                        _checkpointing(pipe.transformer, checkpointing), \
                        _compiled_blocks(pipe.transformer, backend):
                    # steps of seconds: a few runs, not do_bench's hundreds of milliseconds;
                    # the warm-up run compiles
                    run = lambda s=step, a=inputs: pgd_steps(s, a, args.chain)  # noqa: E731
                    row["ms"], row["peak_mib"] = bench(run, pipe.transformer.device, runs=3)
                    row["ms"] /= args.chain * photos
                    if args.profile:
                        row["profile"] = device_time_profile(run, pipe.transformer.device,
                                                             per=args.chain * photos)
            except Exception as exc:  # OOM, a kernel that cannot compile, a CUDA error
                row.update(ms=math.nan, peak_mib=math.nan, note=failure_note(exc))
            if step is graphed_step and row["tokens"] is not None:
                inputs[0]._graphed.release()  # its memory, before the next rows
            if backend is not None:
                # the next resolution compiles for its own shapes, as a run at one resolution
                # does (else Dynamo recompiles with dynamic shapes)
                torch.compiler.reset()
            rows.append(row)
            print(row, flush=True)
            results.write(rows=rows)
    return results.path


if __name__ == "__main__":
    main()
