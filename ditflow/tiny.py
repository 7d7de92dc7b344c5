"""Offline tiny FLUX, Qwen-Image and Step1X-Edit models, built in code (no hub access), for
tests and demos.

The transformers follow the configurations diffusers' own tests use, with two blocks of each
kind so early stop and per-block statistics have something to skip.
"""

from __future__ import annotations

import torch


def tiny_flux_transformer(seed: int = 0, num_layers: int = 2, num_single_layers: int = 2,
                          dtype: torch.dtype = torch.float32):
    """A random FluxTransformer2DModel: 2 heads x 16, 4 latent channels, rope axes (4, 4, 8)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
        pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    ).eval()
    return model if dtype == torch.float32 else model.to(dtype)


def flux_inputs(height: int, width: int, text_len: int = 8, contexts: int = 0, batch: int = 1,
                seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu") -> dict:
    """Random keyword inputs for one call of the tiny transformer: a ``height x width`` target
    (packed tokens) followed by ``contexts`` context images of the same size."""
    from .models.flux import image_ids

    g = torch.Generator().manual_seed(seed)
    tokens = height * width * (1 + contexts)
    ids = torch.cat([image_ids(height, width)] + [image_ids(height, width, 1)] * contexts)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    return dict(
        hidden_states=rand(batch, tokens, 4),
        encoder_hidden_states=rand(batch, text_len, 32),
        pooled_projections=rand(batch, 32),
        timestep=torch.full((batch,), 0.99, device=device, dtype=dtype),
        img_ids=ids.to(device, dtype),
        txt_ids=torch.zeros(text_len, 3, device=device, dtype=dtype),
        guidance=None,
        return_dict=False,
    )


def tiny_qwen_transformer(seed: int = 0, num_layers: int = 2,
                          dtype: torch.dtype = torch.float32, zero_cond_t: bool = False):
    """A random QwenImageTransformer2DModel: 2 heads x 16, 16 input channels (4 latent
    channels in 2x2 patches), text width 16, rope axes (8, 4, 4); ``zero_cond_t``: input
    images modulated as at t = 0 (Qwen-Image-Edit-2511)."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    model = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=num_layers,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
        axes_dims_rope=(8, 4, 4), zero_cond_t=zero_cond_t).eval()
    return model if dtype == torch.float32 else model.to(dtype)


def qwen_inputs(height: int, width: int, text_len: int = 8,
                contexts: tuple[tuple[int, int], ...] = (), batch: int = 1,
                padding: tuple[int, ...] | None = None, seed: int = 0,
                dtype: torch.dtype = torch.float32, device="cpu") -> dict:
    """Random keyword inputs for one call of the tiny Qwen-Image transformer: a ``height x
    width`` target (packed tokens), then context images of the given (height, width) sizes, as
    Qwen-Image-Edit lays them out. ``padding``: per batch element, how many trailing text
    tokens are padding (``encoder_hidden_states_mask`` False); None = no mask."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(1, height, width)] + [(1, h, w) for h, w in contexts]
    tokens = sum(h * w for _, h, w in shapes)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    mask = None
    if padding is not None:
        if len(padding) != batch:
            raise ValueError(f"padding: one count per batch element ({batch}), got {padding}")
        kept = torch.tensor([text_len - p for p in padding])
        mask = (torch.arange(text_len)[None, :] < kept[:, None]).to(device)
    return dict(
        hidden_states=rand(batch, tokens, 16),
        encoder_hidden_states=rand(batch, text_len, 16),
        encoder_hidden_states_mask=mask,
        timestep=torch.full((batch,), 0.99, device=device, dtype=dtype),
        img_shapes=[shapes] * batch,
        return_dict=False,
    )


QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                       "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


class TinyQwenVLProcessor:
    """What QwenImageEditPipeline asks of Qwen2VLProcessor, for the tiny pipeline: image
    patches from Qwen2-VL's (PIL) image processor, and each ``<|image_pad|>`` of a text
    expanded to its image's merged patch count before tokenizing. One image per text (a single
    image serves every text)."""

    def __init__(self, tokenizer, image_processor):
        self.tokenizer = tokenizer
        self.image_processor = image_processor

    def __call__(self, text, images=None, padding=True, return_tensors="pt"):
        from transformers import BatchFeature

        text = [text] if isinstance(text, str) else list(text)
        features = {}
        if images is not None:
            images = images if isinstance(images, list) else [images] * len(text)
            features = dict(self.image_processor(images=images, return_tensors=return_tensors))
            merged = self.image_processor.merge_size ** 2
            counts = (features["image_grid_thw"].prod(-1) // merged).tolist()
            text = [t.replace("<|image_pad|>", "<|image_pad|>" * n)
                    for t, n in zip(text, counts, strict=True)]
        encoded = self.tokenizer(text, padding=padding, return_tensors=return_tensors)
        return BatchFeature({**encoded, **features})


def tiny_qwen_text_encoder(seed: int = 0):
    """(encoder, tokenizer, processor): a random Qwen2.5-VL of width 16 (one text layer, one
    vision layer), a byte-level tokenizer with Qwen's special tokens and no merges, and
    :class:`TinyQwenVLProcessor` with images scaled to at most 112 x 112 pixels."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2TokenizerFast,
    )

    try:  # transformers 5: the PIL backend by name (the default one needs torchvision)
        from transformers import Qwen2VLImageProcessorPil as ImageProcessor
    except ImportError:  # transformers 4: the default one is PIL-based
        from transformers import Qwen2VLImageProcessor as ImageProcessor

    byte_level = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(
        sorted(pre_tokenizers.ByteLevel.alphabet()))}, merges=[]))
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    byte_level.decoder = decoders.ByteLevel()
    tokenizer = Qwen2TokenizerFast(tokenizer_object=byte_level, pad_token="<|endoftext|>",
                                   eos_token="<|im_end|>", unk_token=None)
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:])})
    token_id = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
            rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
            bos_token_id=token_id("<|endoftext|>"), eos_token_id=token_id("<|im_end|>")),
        vision_config=dict(
            depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=16,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
            fullatt_block_indexes=[0]),
        image_token_id=token_id("<|image_pad|>"), video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"))
    torch.manual_seed(seed)
    encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    image_processor = ImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14,
                                     merge_size=2, temporal_patch_size=2)
    return encoder, tokenizer, TinyQwenVLProcessor(tokenizer, image_processor)


def tiny_qwen_edit_pipeline(seed: int = 0, plus: bool = False):
    """A random QwenImageEditPipeline built offline (``plus``: QwenImageEditPlusPipeline, as
    Qwen-Image-Edit-2511, its transformer with ``zero_cond_t``): the tiny transformer, a
    Qwen-Image VAE with 4 latent channels and Qwen's 8x downsampling, and
    :func:`tiny_qwen_text_encoder`. Like the real pipelines it resizes input images to about
    1 MP (64 x 64 context tokens); pass a small ``height``/``width`` (multiples of 16) for the
    output."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageEditPipeline,
        QwenImageEditPlusPipeline,
    )

    encoder, tokenizer, processor = tiny_qwen_text_encoder(seed)
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(
        base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
        temperal_downsample=[False] * 3, latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval()
    pipeline_class = QwenImageEditPlusPipeline if plus else QwenImageEditPipeline
    return pipeline_class(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=encoder,
        tokenizer=tokenizer, processor=processor,
        transformer=tiny_qwen_transformer(seed=seed, zero_cond_t=plus))


def tiny_step1x_transformer(seed: int = 0, num_layers: int = 2, num_single_layers: int = 2,
                            dtype: torch.dtype = torch.float32, version: str = "v1.0"):
    """A random Step1XEditTransformer: the FLUX part as :func:`tiny_flux_transformer` (2 heads
    x 16, 4 packed channels, rope axes (4, 4, 8)), a two-block connector from width 16 (the
    tiny Qwen2.5-VL's) to text width 32; ``version`` as the released ones."""
    from .models.step1x import Step1XEditTransformer

    torch.manual_seed(seed)
    model = Step1XEditTransformer(
        in_channels=4, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=16, num_attention_heads=2, axes_dims_rope=(4, 4, 8),
        llm_channels=16, connector_heads=2, connector_head_dim=16, pooled_dim=32,
        version=version).eval()
    return model if dtype == torch.float32 else model.to(dtype)


def step1x_inputs(height: int, width: int, text_len: int = 8, batch: int = 1,
                  padding: tuple[int, ...] | None = None, version: str = "v1.0", seed: int = 0,
                  dtype: torch.dtype = torch.float32, device="cpu") -> dict:
    """Random keyword inputs for one call of the tiny Step1X-Edit transformer: a ``height x
    width`` target then a reference of the same size (packed tokens, ``version``'s ids);
    ``padding``: per batch element, how many trailing text tokens are padding (mask 0)."""
    from .models.flux import image_ids
    from .models.step1x import reference_ids

    g = torch.Generator().manual_seed(seed)
    padding = padding or (0,) * batch
    if len(padding) != batch:
        raise ValueError(f"padding: one count per batch element ({batch}), got {padding}")
    kept = torch.tensor([text_len - p for p in padding])
    ids = torch.cat([image_ids(height, width), reference_ids(height, width, version)])

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    return dict(
        hidden_states=rand(batch, 2 * height * width, 4),
        encoder_hidden_states=rand(batch, text_len, 16),
        encoder_attention_mask=(torch.arange(text_len)[None] < kept[:, None]).long().to(device),
        timestep=torch.full((batch,), 0.99, device=device, dtype=dtype),
        img_ids=ids.to(device, dtype),
        return_dict=False,
    )


def tiny_step1x_edit_pipeline(seed: int = 0):
    """A random :class:`~ditflow.models.step1x.Step1XEditPipeline` built offline: the tiny
    transformer, :func:`tiny_qwen_text_encoder`, the tiny FLUX pipelines' VAE and 64 text
    tokens; call with small ``height``/``width`` (multiples of 2)."""
    from .models.step1x import CHAT, QWEN_PREFIX, Step1XEditPipeline

    encoder, tokenizer, processor = tiny_qwen_text_encoder(seed)
    torch.manual_seed(seed)
    # the template: every token before the photo's "Picture 1: " label
    template = CHAT.format(prefix=QWEN_PREFIX, instruction="").split("Picture 1: ")[0]
    return Step1XEditPipeline(
        transformer=tiny_step1x_transformer(seed=seed), vae=tiny_flux_vae(),
        text_encoder=encoder, processor=processor,
        template_tokens=len(tokenizer(template).input_ids), max_text_tokens=64)


# Words the tiny tokenizers know; anything else maps to [UNK].
VOCABULARY = (
    "a an the of and with in on to this that is are make turn change add remove put give "
    "photo picture image person man woman child dog cat face hair eyes smile smiling glasses hat "
    "red green blue yellow black white orange purple pink gray brown circle square triangle star "
    "left right top bottom big small background sky beach city forest snow night day style "
    "painting sketch cartoon wearing holding looking standing sitting jumping happy sad angry"
).split()


def tiny_tokenizer(max_length: int, vocabulary: tuple[str, ...] = VOCABULARY):
    """A word-level tokenizer built in code ([PAD]=0, [UNK]=1, [EOS]=2), lower-cased."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2}
    vocab.update({word: i + 3 for i, word in enumerate(dict.fromkeys(vocabulary))})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]",
                                   unk_token="[UNK]", eos_token="[EOS]",
                                   model_max_length=max_length)


def tiny_text_encoders(vocabulary: tuple[str, ...], text_tokens: int, feed_forward: int,
                       seed: int = 0):
    """(clip, clip_tokenizer, t5, t5_tokenizer): random CLIP and T5 encoders of width 32 and
    word-level tokenizers over ``vocabulary`` (T5 side: ``text_tokens`` long), built offline."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    vocab_size = len(vocabulary) + 3
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=feed_forward,
        num_attention_heads=4, num_hidden_layers=2, projection_dim=32,
        max_position_embeddings=77, pad_token_id=0, bos_token_id=2, eos_token_id=2)).eval()
    t5 = T5EncoderModel(T5Config(
        vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=feed_forward, num_layers=2,
        num_heads=4, pad_token_id=0, eos_token_id=2, decoder_start_token_id=0)).eval()
    return clip, tiny_tokenizer(77, vocabulary), t5, tiny_tokenizer(text_tokens, vocabulary)


def tiny_flux_vae():
    """A random FLUX-style AutoencoderKL: one latent channel, no downsampling."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,),
        layers_per_block=1, latent_channels=1, norm_num_groups=1, use_quant_conv=False,
        use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035).eval()


def tiny_flux_pipeline(kind: str = "kontext", seed: int = 0):
    """A random FLUX pipeline built offline: ``kind`` is ``"kontext"`` (FluxKontextPipeline) or
    ``"t2i"`` (FluxPipeline). VAE with one latent channel (x1 scale), CLIP and T5 encoders of
    width 32, word-level tokenizers; call with small ``height``/``width`` (multiples of 2) and a
    small ``max_sequence_length``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxPipeline

    if kind not in ("kontext", "t2i"):
        raise ValueError(f"kind={kind!r}: expected 'kontext' or 't2i'")
    clip, clip_tokenizer, t5, t5_tokenizer = tiny_text_encoders(VOCABULARY, 512, 37, seed)
    vae = tiny_flux_vae()
    pipeline_class = FluxKontextPipeline if kind == "kontext" else FluxPipeline
    return pipeline_class(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip,
        tokenizer=clip_tokenizer, text_encoder_2=t5, tokenizer_2=t5_tokenizer,
        transformer=tiny_flux_transformer(seed=seed))
