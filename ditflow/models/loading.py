"""Loading real pipelines from a local directory (never from a hub)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

FLUX_PIPELINES = {"kontext": "FluxKontextPipeline", "t2i": "FluxPipeline"}
QWEN_PIPELINES = {"edit": "QwenImageEditPipeline", "edit-plus": "QwenImageEditPlusPipeline",
                  "t2i": "QwenImagePipeline"}


def model_index(folder: Path) -> dict:
    """A diffusers folder's model_index.json; ValueError naming the file if it is not JSON."""
    index = folder / "model_index.json"
    try:
        return json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{index} is not valid JSON ({exc})") from None


def missing_components(path: Path, given: tuple[str, ...] = ()) -> list[str]:
    """What a diffusers pipeline folder lacks: model_index.json and the folders of the
    components it names (except components ``given`` by the caller and optional ones listed
    as null)."""
    if not (path / "model_index.json").is_file():
        return ["model_index.json"]
    index = model_index(path)
    wanted = [name for name, entry in index.items()
              if not name.startswith("_") and isinstance(entry, list) and entry[0] is not None
              and name not in given]
    return [f"{name}/" for name in wanted if not (path / name).is_dir()]


def _load_local(path: str | Path, pipeline_name: str, example: str, dtype: torch.dtype,
                components: dict | None = None):
    import diffusers

    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such model directory (a diffusers pipeline folder, "
                                f"e.g. a local copy of {example})")
    components = components or {}
    missing = missing_components(path, tuple(components))
    if missing:
        raise FileNotFoundError(f"{path} is not a complete diffusers pipeline folder; missing: "
                                f"{', '.join(missing)}")
    held = model_index(path).get("_class_name")
    if held is not None and held != pipeline_name:
        raise ValueError(f"{path} holds a {held}; this needs a {pipeline_name}")
    pipeline_class = getattr(diffusers, pipeline_name)
    return pipeline_class.from_pretrained(path, dtype=dtype, local_files_only=True, **components)


def _pipeline_name(kind: str, pipelines: dict[str, str]) -> str:
    if kind not in pipelines:
        raise ValueError(f"kind={kind!r}: expected one of {', '.join(pipelines)}")
    return pipelines[kind]


# The in-context editors ditflow loads from diffusers folders, by pipeline class (Step1X-Edit
# comes as the authors' release files; ditflow.models.EDITORS lists every editor pipeline).
DIFFUSERS_EDITORS = ("FluxKontextPipeline", "QwenImageEditPipeline", "QwenImageEditPlusPipeline")


def load_editor(path: str | Path, dtype: torch.dtype = torch.bfloat16):
    """The in-context editor in a local folder: FLUX.1 Kontext or Qwen-Image-Edit (-2509/2511)
    from a diffusers folder, chosen by its model_index.json, or Step1X-Edit from the authors'
    release files (:func:`load_step1x_pipeline`); an error names what the folder holds
    otherwise."""
    folder = Path(path).expanduser()
    if _is_step1x_release(folder):
        return load_step1x_pipeline(path, dtype)
    if folder.is_file():
        raise ValueError(f"{path} is a file; give the model's folder")
    # without a model_index.json the loader explains what is missing
    indexed = (folder / "model_index.json").is_file()
    name = model_index(folder).get("_class_name") if indexed else DIFFUSERS_EDITORS[0]
    if name not in DIFFUSERS_EDITORS:
        raise ValueError(f"{path} holds a {name}; ditflow's editors are "
                         f"{', '.join(DIFFUSERS_EDITORS)} (diffusers folders) and Step1X-Edit "
                         f"(the authors' release: {STEP1X_CHECKPOINTS})")
    return _load_local(path, name, "black-forest-labs/FLUX.1-Kontext-dev or Qwen/Qwen-Image-Edit",
                       dtype)


def editor_transformer_name(path: str | Path) -> str | None:
    """The transformer class :func:`load_editor` builds from ``path`` (``FluxTransformer2DModel``,
    ``QwenImageTransformer2DModel``, ``Step1XEditTransformer``), read from the folder's files
    without loading anything; None where ``path`` holds no editor (loading it says why)."""
    folder = Path(path).expanduser()
    if _is_step1x_release(folder):
        return "Step1XEditTransformer"
    if not (folder / "model_index.json").is_file():
        return None
    try:
        index = model_index(folder)
    except ValueError:
        return None
    transformer = index.get("transformer")
    if index.get("_class_name") not in DIFFUSERS_EDITORS or not isinstance(transformer, list):
        return None
    return transformer[-1]


def _is_step1x_release(path: Path) -> bool:
    """Whether ``path`` is a Step1X-Edit checkpoint, or a folder of the authors' release files
    (a checkpoint and no model_index.json)."""
    if path.is_file():
        return path.match(STEP1X_CHECKPOINTS)
    return not (path / "model_index.json").is_file() and any(path.glob(STEP1X_CHECKPOINTS))


def load_flux_pipeline(path: str | Path, kind: str = "kontext",
                       dtype: torch.dtype = torch.bfloat16):
    """FLUX.1 Kontext (``kind="kontext"``) or FLUX.1 (``"t2i"``) from a local diffusers folder,
    with ``local_files_only=True``. Errors name the folder and what is missing."""
    example = "black-forest-labs/FLUX.1-" + ("Kontext-dev" if kind == "kontext" else "dev")
    return _load_local(path, _pipeline_name(kind, FLUX_PIPELINES), example, dtype)


def load_qwen_pipeline(path: str | Path, kind: str = "edit", dtype: torch.dtype = torch.bfloat16,
                       **components):
    """Qwen-Image-Edit (``kind="edit"``), Qwen-Image-Edit-2509/2511 (``"edit-plus"``: several
    input images) or Qwen-Image (``"t2i"``) from a local diffusers folder, with
    ``local_files_only=True``. ``components`` replace loaded ones: ``text_encoder=None,
    tokenizer=None, processor=None`` skips the 7B Qwen2.5-VL encoder when you call the pipeline
    with precomputed ``prompt_embeds``. Errors name the folder and what is missing."""
    return _load_local(path, _pipeline_name(kind, QWEN_PIPELINES), "Qwen/Qwen-Image-Edit", dtype,
                       components)


STEP1X_CHECKPOINTS = "step1x-edit*.safetensors"
STEP1X_ENCODER = "Qwen2.5-VL-7B-Instruct"
# FLUX.1's VAE, which Step1X-Edit ships as vae.safetensors (original parameter names).
FLUX_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2,
                block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, shift_factor=0.1159,
                scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False)


def load_step1x_pipeline(path: str | Path, dtype: torch.dtype = torch.bfloat16,
                         checkpoint: str | None = None, version: str | None = None):
    """Step1X-Edit from a local folder laid out as the authors' release: a transformer
    checkpoint ``step1x-edit*.safetensors`` (where there are several, ``checkpoint`` names one,
    or ``path`` is that file), ``vae.safetensors`` and the ``Qwen2.5-VL-7B-Instruct/`` folder.
    ``version``: ``"v1.0"`` or ``"v1.1"``; by default v1.1 when the checkpoint's file name says
    so (``v1p1``, as the authors name it), else v1.0. Errors name the folder and what is
    missing."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from safetensors.torch import load_file
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from .step1x import (
        QWEN_MAX_PIXELS,
        QWEN_MIN_PIXELS,
        Step1XEditPipeline,
        Step1XEditTransformer,
        convert_step1x_checkpoint,
    )

    path = Path(path).expanduser()
    if path.is_file():  # the checkpoint itself: the folder is its own
        path, checkpoint = path.parent, path.name
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such model directory (a local copy of "
                                f"stepfun-ai/Step1X-Edit with {STEP1X_ENCODER}/)")
    found = sorted(p.name for p in path.glob(STEP1X_CHECKPOINTS))
    if checkpoint is None and len(found) > 1:
        raise ValueError(f"{path} holds several Step1X-Edit checkpoints ({', '.join(found)}); "
                         f"name one: the file's own path as the model (--model {path}/FILE), "
                         "or checkpoint=")
    checkpoint = checkpoint or (found[0] if found else STEP1X_CHECKPOINTS)
    missing = [name for name in (checkpoint, "vae.safetensors") if not (path / name).is_file()]
    missing += [f"{STEP1X_ENCODER}/"] if not (path / STEP1X_ENCODER).is_dir() else []
    if missing:
        raise FileNotFoundError(f"{path} is not a complete Step1X-Edit folder; missing: "
                                f"{', '.join(missing)}")
    version = version or ("v1.1" if "v1p1" in checkpoint else "v1.0")
    with torch.device("meta"):  # the checkpoints' tensors become the parameters
        transformer = Step1XEditTransformer(version=version)
        vae = AutoencoderKL(**FLUX_VAE)
    transformer.load_state_dict(convert_step1x_checkpoint(load_file(path / checkpoint)),
                                strict=True, assign=True)
    vae.load_state_dict(convert_ldm_vae_checkpoint(load_file(path / "vae.safetensors"),
                                                   vae.config), strict=True, assign=True)
    encoder = path / STEP1X_ENCODER
    return Step1XEditPipeline(
        # the VAE stays in fp32, as the authors run it
        transformer=transformer.to(dtype).eval(), vae=vae.float().eval(),
        text_encoder=Qwen2_5_VLForConditionalGeneration.from_pretrained(
            encoder, dtype=dtype, local_files_only=True).eval(),
        processor=AutoProcessor.from_pretrained(encoder, min_pixels=QWEN_MIN_PIXELS,
                                                max_pixels=QWEN_MAX_PIXELS,
                                                local_files_only=True))


def pipeline_by_name(model: str, device: str, kind: str = "kontext"):
    """The pipeline a command names with ``--model``, on ``device``: ``"tiny"`` (FLUX.1 /
    FLUX.1 Kontext), ``"tiny-qwen"``, ``"tiny-step1x"`` (random tiny editors), ``"testbed"``
    (the trained testbed models) or a local folder (bf16 on a GPU, else fp32). ``kind``:
    ``"kontext"`` (FLUX.1 Kontext), ``"t2i"`` (FLUX.1) or ``"editor"`` (any in-context editor
    DeContext protects against: FLUX.1 Kontext, Qwen-Image-Edit or Step1X-Edit)."""
    if model == "tiny":
        from ..tiny import tiny_flux_pipeline

        return tiny_flux_pipeline("t2i" if kind == "t2i" else "kontext").to(device)
    if model == "tiny-qwen":
        from ..tiny import tiny_qwen_edit_pipeline

        return tiny_qwen_edit_pipeline().to(device)
    if model == "tiny-step1x":
        from ..tiny import tiny_step1x_edit_pipeline

        return tiny_step1x_edit_pipeline().to(device)
    if model == "testbed":
        from ..testbed.models import testbed_pipeline

        return testbed_pipeline("t2i" if kind == "t2i" else "editor").to(device)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if kind == "editor":
        return load_editor(model, dtype=dtype).to(device)
    return load_flux_pipeline(model, kind=kind, dtype=dtype).to(device)
