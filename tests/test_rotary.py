"""Rotary embeddings, fused: diffusers' apply_rotary_emb (FLUX) and apply_rotary_emb_qwen
(Qwen-Image) are the specification."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxPosEmbed
from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen
from helpers import TRITON_DEVICE, TRITON_ON_CPU

from ditflow import rotary

# fp32 and fp16 wherever the kernel runs; bf16 compiled only (the interpreter's bf16 is off)
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if not TRITON_ON_CPU else [])


def _freqs(tokens: int, axes=(4, 6, 6)):
    """FLUX's (cos, sin) [tokens, sum(axes)] for random position ids."""
    ids = torch.randint(0, 64, (tokens, 3)).float()
    return FluxPosEmbed(theta=10000, axes_dim=list(axes))(ids)


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("DITFLOW_BACKEND", "triton")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("batch", "tokens"), [(1, 1), (2, 37), (1, 70)])
def test_fused_rotary_is_diffusers_forward_and_backward(triton_backend, dtype, batch, tokens):
    cos, sin = (f.to(TRITON_DEVICE) for f in _freqs(tokens))
    # a view as the processor makes it: heads unflattened from a projection
    x = torch.randn(batch, tokens, 3 * 16, device=TRITON_DEVICE).to(dtype).unflatten(-1, (3, 16))
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = rotary.apply_rotary(ours, (cos, sin))
    want = apply_rotary_emb(theirs, (cos, sin), sequence_dim=1)
    assert got.dtype == dtype and got.shape == x.shape
    # computed in fp32 and rounded once, as diffusers does: equal up to an fma's rounding
    torch.testing.assert_close(got, want, rtol=0, atol=torch.finfo(dtype).eps * 4)
    dout = torch.randn(batch, 3, tokens, 16, device=TRITON_DEVICE).to(dtype).transpose(1, 2)
    got.backward(dout)
    want.backward(dout)
    # diffusers rounds the two paths of the gradient to x's dtype before summing them; the
    # kernel sums in fp32: within two roundings
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=0,
                               atol=torch.finfo(dtype).eps * 8)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_complex_rotary_is_qwen_images(triton_backend, dtype):
    """Qwen-Image's complex frequencies [S, D / 2] rotate the same pairs."""
    tokens, heads, head_dim = 37, 3, 16
    angles = torch.rand(tokens, head_dim // 2, device=TRITON_DEVICE) * 6.3
    freqs = torch.polar(torch.ones_like(angles), angles)  # complex64
    x = torch.randn(2, tokens, heads, head_dim, device=TRITON_DEVICE).to(dtype)
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = rotary.apply_rotary_complex(ours, freqs)
    want = apply_rotary_emb_qwen(theirs, freqs, use_real=False)
    torch.testing.assert_close(got, want, rtol=0, atol=torch.finfo(dtype).eps * 4)
    dout = torch.randn_like(want)
    got.backward(dout)
    want.backward(dout)
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=0, atol=torch.finfo(dtype).eps * 8)


def test_the_kernel_runs_where_flow_attention_runs_triton(triton_backend, monkeypatch):
    cos, sin = (f.to(TRITON_DEVICE) for f in _freqs(5))
    x = torch.randn(1, 5, 2, 16, device=TRITON_DEVICE)
    launches = []
    kernels = rotary.ops._kernels()
    launch = kernels.rotary_embedding
    monkeypatch.setattr(kernels, "rotary_embedding",
                        lambda *args, **kw: launches.append(1) or launch(*args, **kw))
    rotary.apply_rotary(x, (cos, sin))
    assert launches == [1]
    # head dims of 2^k only (12 is not)
    rotary.apply_rotary(torch.randn(1, 5, 2, 12, device=TRITON_DEVICE), _freqs(5, (4, 4, 4)))
    assert launches == [1]


def test_other_backends_use_diffusers(monkeypatch):
    monkeypatch.setenv("DITFLOW_BACKEND", "reference")
    monkeypatch.setattr(rotary, "_FusedRotary", None)  # would fail if reached
    cos, sin = _freqs(5)
    x = torch.randn(1, 5, 2, 16)
    assert torch.equal(rotary.apply_rotary(x, (cos, sin)),
                       apply_rotary_emb(x, (cos, sin), sequence_dim=1))
    freqs = torch.polar(torch.ones(5, 8), torch.rand(5, 8))
    assert torch.equal(rotary.apply_rotary_complex(x, freqs),
                       apply_rotary_emb_qwen(x, freqs, use_real=False))
