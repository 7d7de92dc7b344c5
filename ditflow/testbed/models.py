"""The testbed's models: real diffusers/transformers classes at toy size, built in code.

A 32x32-pixel scene is encoded by a one-level AutoencoderKL (4 latent channels, no
downsampling) into 32x32 latents, packed by FLUX's 2x2 patching into 16x16 = 256 image tokens of
16 channels. Text goes through frozen random CLIP and T5 encoders (width 32) with a word-level
tokenizer over the scene vocabulary. The transformers are FluxTransformer2DModel with 2 double and
4 single blocks, 4 heads x 16.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..tiny import tiny_text_encoders
from .scenes import BACKGROUNDS, COLORS, POSITIONS, ROWS, SHAPES

WEIGHTS = Path(__file__).resolve().parent / "weights"
TEXT_TOKENS = 24
VOCABULARY = tuple(dict.fromkeys(
    "a an the and on to of make move add remove".split()
    + list(COLORS) + list(SHAPES) + list(BACKGROUNDS) + list(POSITIONS) + list(ROWS)))


def build_text_encoders(seed: int = 0):
    """(clip, clip_tokenizer, t5, t5_tokenizer), frozen random encoders over the vocabulary."""
    return tiny_text_encoders(VOCABULARY, TEXT_TOKENS, feed_forward=64, seed=seed)


def build_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32,),
        layers_per_block=1, norm_num_groups=8, down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",), use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0, scaling_factor=1.0)


def build_transformer(seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=[4, 6, 6], guidance_embeds=False)


def assemble(kind: str, transformer, vae, text_encoders):
    """A FluxKontextPipeline (``"editor"``) or FluxPipeline (``"t2i"``) from components."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxPipeline

    clip, clip_tok, t5, t5_tok = text_encoders
    cls = FluxKontextPipeline if kind == "editor" else FluxPipeline
    return cls(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip,
               tokenizer=clip_tok, text_encoder_2=t5, tokenizer_2=t5_tok,
               transformer=transformer)


def testbed_pipeline(kind: str = "editor", weights: Path = WEIGHTS):
    """The trained testbed model (``"editor"``: FLUX Kontext-style; ``"t2i"``), offline."""
    from ..models.loading import load_flux_pipeline

    folder = Path(weights) / kind
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no trained testbed {kind}; train it with "
                                f"`python -m ditflow.testbed.train {kind}`")
    return load_flux_pipeline(folder, kind="kontext" if kind == "editor" else "t2i",
                              dtype=torch.float32)
