"""Train the testbed models on procedural scenes, on a CPU or a GPU.

    python -m ditflow.testbed.train vae --steps 600
    python -m ditflow.testbed.train editor --minutes 40
    python -m ditflow.testbed.train t2i --minutes 20

Each run writes a diffusers pipeline folder under ``ditflow/testbed/weights/`` (the VAE alone
for ``vae``), saving as it goes; ``--resume`` continues the saved model (give it a new
``--seed`` to draw new scenes). The
transformers learn rectified flow (FLUX's objective): x_t = (1 - s) x0 + s e, predict e - x0,
with s drawn logit-normal. The editor sees the clean context scene's tokens after the noisy
target's, with FLUX Kontext's position ids (context index 1), and its loss covers the target only.
"""

from __future__ import annotations

import argparse
import copy
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..io import pixels_tensor
from ..models.flux import encode_image, image_ids, pack_latents
from .models import (
    TEXT_TOKENS,
    WEIGHTS,
    assemble,
    build_text_encoders,
    build_transformer,
    build_vae,
    testbed_pipeline,
)
from .scenes import SIZE, random_edit, random_scene, render


def _pixels(images: list[np.ndarray]) -> torch.Tensor:
    return torch.stack([pixels_tensor(image) for image in images])


def train_vae(steps: int, batch: int, out: Path, seed: int) -> None:
    """Reconstruction (plus a small KL) on rendered scenes."""
    rng = random.Random(seed)
    vae = build_vae(seed).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    for step in range(steps):
        x = _pixels([render(random_scene(rng)) for _ in range(batch)]) * 2 - 1
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = (recon - x).square().mean() + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"vae step {step}: loss {loss.item():.5f}", flush=True)
    # Normalise the latents as FLUX does ((z - shift) * scale ~ zero mean, unit variance), so
    # the flow's noise and data have the same scale.
    vae.eval()
    with torch.no_grad():
        x = _pixels([render(random_scene(rng)) for _ in range(256)]) * 2 - 1
        z = vae.encode(x).latent_dist.mode()
    vae.register_to_config(shift_factor=z.mean().item(), scaling_factor=1 / z.std().item())
    vae.save_pretrained(out / "vae")


class _TextCache:
    """Prompt embeddings from the frozen encoders, computed once per distinct text."""

    def __init__(self, pipeline):
        self.pipeline = pipeline
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, texts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if missing:
            with torch.no_grad():
                embeds, pooled, _ = self.pipeline.encode_prompt(
                    prompt=missing, prompt_2=None, device=device,
                    max_sequence_length=TEXT_TOKENS)
            for i, text in enumerate(missing):
                self.cache[text] = (embeds[i], pooled[i])
        embeds, pooled = zip(*(self.cache[t] for t in texts), strict=True)
        return torch.stack(embeds).to(device), torch.stack(pooled).to(device)


def _save(pipeline, transformer_ema, folder: Path) -> None:
    """Write the pipeline with the EMA transformer, through a temporary folder."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    original = pipeline.transformer
    pipeline.transformer = transformer_ema
    try:
        pipeline.save_pretrained(tmp)
    finally:
        pipeline.transformer = original
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def train_transformer(kind: str, minutes: float, steps: int | None, batch: int, lr: float,
                      out: Path, seed: int, resume: bool, device: str) -> None:
    from diffusers import AutoencoderKL

    vae_folder = out / "vae"
    if not vae_folder.is_dir():
        raise FileNotFoundError(f"{vae_folder}: train the VAE first "
                                "(python -m ditflow.testbed.train vae)")
    vae = AutoencoderKL.from_pretrained(vae_folder).to(device).eval().requires_grad_(False)
    folder = out / kind
    if resume and not (folder / "transformer").is_dir():
        raise FileNotFoundError(f"--resume: no saved {kind} model in {folder}: leave out "
                                "--resume to train one from scratch")
    if resume:
        # continue the saved model, text encoders included; --seed then only draws new data
        saved = testbed_pipeline(kind, out)
        transformer = build_transformer(seed)  # fresh config: no local path saved into it
        transformer.load_state_dict(saved.transformer.state_dict())
        encoders = (saved.text_encoder, saved.tokenizer, saved.text_encoder_2, saved.tokenizer_2)
    else:
        transformer = build_transformer(seed)
        encoders = build_text_encoders(seed)
    transformer = transformer.to(device).train()
    pipeline = assemble(kind, transformer, vae, encoders)
    pipeline.text_encoder.to(device).requires_grad_(False)
    pipeline.text_encoder_2.to(device).requires_grad_(False)
    text = _TextCache(pipeline)
    ema = copy.deepcopy(transformer).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(seed + (1 if kind == "editor" else 2))
    g = torch.Generator(device="cpu").manual_seed(seed)
    side = SIZE // 2
    ids = image_ids(side, side, 0, device)
    if kind == "editor":
        ids = torch.cat([ids, image_ids(side, side, 1, device)])
    start = time.perf_counter()
    step = 0
    while True:
        elapsed = (time.perf_counter() - start) / 60
        if (steps is not None and step >= steps) or (steps is None and elapsed >= minutes):
            break
        if kind == "editor":
            edits = [random_edit(rng) for _ in range(batch)]
            prompts = [e.instruction for e in edits]
            targets = _pixels([render(e.target) for e in edits])
            contexts = _pixels([render(e.context) for e in edits])
        else:
            scenes = [random_scene(rng) for _ in range(batch)]
            prompts = [s.caption() for s in scenes]
            targets = _pixels([render(s) for s in scenes])
        with torch.no_grad():
            x0 = pack_latents(encode_image(vae, targets.to(device)))
            context = (pack_latents(encode_image(vae, contexts.to(device)))
                       if kind == "editor" else None)
        embeds, pooled = text(prompts, device)
        sigma = torch.sigmoid(torch.randn(batch, generator=g)).to(device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        noisy = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
        hidden = noisy if context is None else torch.cat([noisy, context], dim=1)
        pred = transformer(hidden_states=hidden, encoder_hidden_states=embeds,
                           pooled_projections=pooled, timestep=sigma, img_ids=ids,
                           txt_ids=torch.zeros(embeds.shape[1], 3, device=device),
                           return_dict=False)[0][:, : x0.shape[1]]
        loss = (pred - (noise - x0)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), transformer.parameters(), strict=True):
                p_ema.lerp_(p, 1 - 0.998)
        if step % 100 == 0:
            print(f"{kind} step {step} ({elapsed:.1f} min): loss {loss.item():.4f}", flush=True)
        if step % 2000 == 1999:
            _save(pipeline, ema, folder)
        step += 1
    _save(pipeline, ema, folder)
    print(f"{kind}: {step} steps in {(time.perf_counter() - start) / 60:.1f} min -> {folder}")


def _positive(kind: type):
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its "invalid value" errors
    return parse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["vae", "editor", "t2i"])
    parser.add_argument("--minutes", type=_positive(float), default=30.0,
                        help="editor, t2i: minutes of training (default 30)")
    parser.add_argument("--steps", type=_positive(int), default=None,
                        help="steps instead of --minutes (vae: its only budget, default 600)")
    parser.add_argument("--batch", type=_positive(int), default=32)
    parser.add_argument("--lr", type=_positive(float), default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    parser.add_argument("--resume", action="store_true",
                        help="editor, t2i: continue the model saved in --out")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.resume and args.what == "vae":
        parser.error("--resume continues a transformer (editor, t2i); the VAE trains from scratch")
    torch.manual_seed(args.seed)
    if args.what == "vae":
        train_vae(args.steps or 600, args.batch, args.out, args.seed)
    else:
        train_transformer(args.what, args.minutes, args.steps, args.batch, args.lr, args.out,
                          args.seed, args.resume, args.device)


if __name__ == "__main__":
    main()
