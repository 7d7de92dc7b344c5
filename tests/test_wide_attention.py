"""Attention over wide heads (the VAEs' mid-block attention): SDPA is the specification."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_within_rule, floor_for

from ditflow import wide_attention as wide

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# half precision only where it multiplies on tensor cores (the CPU upcasts)
DTYPES = [torch.float32, torch.float64] + (
    [torch.bfloat16, torch.float16] if DEVICE.type == "cuda" else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("nq", "nk", "chunk"), [(1, 1, None), (37, 53, 8), (64, 64, 5)])
def test_wide_attention_is_sdpa_forward_and_backward(monkeypatch, dtype, nq, nk, chunk):
    """Against SDPA in float64 over the same inputs, with query chunks that do and do not
    divide the queries (two leading dimensions, a head of 320 channels); in half precision
    within flash-attention's rule: twice the error of SDPA in that precision, plus a floor."""
    if chunk is not None:
        monkeypatch.setattr(wide, "CHUNK_SCORES", chunk * nk)
    q = torch.randn(2, 1, nq, 320, device=DEVICE).to(dtype)
    k, v = (torch.randn(2, 1, nk, 320, device=DEVICE).to(dtype) for _ in range(2))
    dout = torch.randn(2, 1, nq, 320, device=DEVICE).to(dtype)

    def run(attention, inputs, cotangent):
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = attention(*leaves)
        out.backward(cotangent)
        return [out, *(leaf.grad for leaf in leaves)]

    got = run(wide.wide_attention, (q, k, v), dout)
    truth = run(F.scaled_dot_product_attention, (q.double(), k.double(), v.double()),
                dout.double())
    assert [t.dtype for t in got] == [dtype] * 4
    if dtype in (torch.float32, torch.float64):
        tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5,
                                                                                atol=1e-5)
        for mine, exact in zip(got, truth, strict=True):
            torch.testing.assert_close(mine.double(), exact, **tol)
        return
    lowprec = run(F.scaled_dot_product_attention, (q, k, v), dout)
    for name, mine, sdpa, exact in zip(("out", "dq", "dk", "dv"), got, lowprec, truth,
                                       strict=True):
        assert_within_rule(name, mine, sdpa, exact, floor_for(dtype))


def test_the_mode_routes_wide_unmasked_heads_only():
    x = torch.randn(1, 1, 10, 512)
    narrow = torch.randn(1, 2, 10, 64)
    with wide.wide_heads_sdpa() as mode:
        got = F.scaled_dot_product_attention(x, x, x)
        F.scaled_dot_product_attention(narrow, narrow, narrow)  # flash and cuDNN take these
        F.scaled_dot_product_attention(x, x, x, is_causal=True)
        F.scaled_dot_product_attention(x, x, x, attn_mask=torch.ones(10, 10, dtype=torch.bool))
    assert mode.routed == 1
    torch.testing.assert_close(got, F.scaled_dot_product_attention(x, x, x), rtol=1e-5,
                               atol=1e-6)


def _assert_encodes_as_sdpa(vae, pixels):
    """``vae``'s encoding of ``pixels`` and its gradient, through the mode, are SDPA's, and
    the mode routed its attention."""

    def encoded(x):
        return vae.encode(x).latent_dist.mode()

    x = pixels.clone().requires_grad_()
    want = encoded(x)
    (want_grad,) = torch.autograd.grad(want.square().sum(), x)
    x = pixels.clone().requires_grad_()
    with wide.wide_heads_sdpa() as mode:
        got = encoded(x)
    (got_grad,) = torch.autograd.grad(got.square().sum(), x)
    assert mode.routed == 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-6)


def test_a_flux_vae_encoder_through_the_mode_gives_its_own_gradient():
    """FLUX.1's VAE encoder (its mid-block attention: one head as wide as the last level),
    narrowed to a 264-channel head."""
    pytest.importorskip("diffusers")
    from benchmarks.protect_step import _flux_vae

    torch.manual_seed(0)
    vae = _flux_vae(block_out_channels=(8, 8, 8, 264), norm_num_groups=4).to(DEVICE)
    _assert_encodes_as_sdpa(vae, torch.rand(1, 3, 64, 64, device=DEVICE))


def test_a_qwen_image_vae_encoder_through_the_mode_gives_its_own_gradient():
    """Qwen-Image's VAE (its attention reads q, k, v as strided chunks of one projection, one
    frame at a time), narrowed to a 288-channel head."""
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(base_dim=72, z_dim=4, latents_mean=[0.0] * 4,
                                 latents_std=[1.0] * 4).eval().to(DEVICE)
    _assert_encodes_as_sdpa(vae, torch.rand(1, 3, 1, 64, 64, device=DEVICE))


def test_a_protector_step_through_wide_vae_attention_keeps_its_gradient(monkeypatch):
    """What a Protector does on a GPU (``wide_vae_attention``), here on the CPU: FLUX.1
    Kontext's step with a VAE whose mid-block head is wider than SDPA's fused kernels take
    routes it, and the photo's gradient stays SDPA's; the authors' recipe in the benchmark
    keeps the VAE's own attention."""
    pytest.importorskip("diffusers")
    from benchmarks import protect_step
    from ditflow.methods.decontext import _frozen

    transformer, _ = protect_step.host_models()
    vae = protect_step._flux_vae(block_out_channels=(8, 8, 8, 264), norm_num_groups=4)
    pipe = protect_step.kontext_editor(transformer, vae)
    config = protect_step._config("host", 64)
    inputs, _ = protect_step._step_inputs(pipe, config)
    protector = inputs[0]
    routed = []
    apply = wide._WideAttention.apply
    monkeypatch.setattr(wide._WideAttention, "apply",
                        lambda *args: routed.append(1) or apply(*args))
    with _frozen(transformer, vae):
        assert not protector.wide_vae_attention  # a CPU
        want = protect_step.ditflow_step(*inputs)
        protector.wide_vae_attention = True
        got = protect_step.ditflow_step(*inputs)
        assert routed == [1]
        protect_step.eager_step(*inputs)
        assert routed == [1] and protector.wide_vae_attention
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
