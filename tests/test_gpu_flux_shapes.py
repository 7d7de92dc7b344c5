"""Compiled kernels at real FLUX Kontext, Step1X-Edit and Qwen-Image-Edit shapes (GPU only):
bf16/fp16, forward and backward.

Truth is the reference in fp32 (forward chunked, closed-form backward chunked: the full autograd
graph would not fit); the kernel must stay within 2x the error of the reference run in the low
precision dtype, plus a small floor.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_within_rule, floor_for

from ditflow import FlowRules, flow_attention
from ditflow.reference import flow_attention_reference, flow_attention_reference_backward

TEXT, TARGET, CONTEXT = 0, 1, 2
# (text, target, context) token counts: Kontext at 512² and 1024², Step1X-Edit at 512²
SHAPES = {"kontext-512": (512, 1024, 1024), "kontext-1024": (512, 4096, 4096),
          "step1x-512": (640, 1024, 1024)}


def kontext_rules() -> FlowRules:
    """Every rule kind on a real layout: context damped, text boosted, one head pair blocked."""
    return (FlowRules(num_groups=3)
            .weight_probs([TEXT, TARGET], CONTEXT, 0.4)
            .scale_logits(TARGET, TEXT, 1.05)
            .add_bias(TARGET, TARGET, 0.1)
            .block(TEXT, CONTEXT, heads=[0, 5], num_heads=24))


def _check_against_reference(name: str, q_groups, k_groups, rules: FlowRules, batch: int,
                             dtype) -> None:
    """Compiled kernels vs the fp32 reference: out, lse, mass and all three gradients."""
    device = torch.device("cuda")
    n, heads, head_dim, g = q_groups.shape[-1], 24, 128, rules.num_groups
    q, k, v = (torch.randn(batch, n, heads, head_dim, device=device) for _ in range(3))
    dout = torch.randn(batch, n, heads, head_dim, device=device)
    dmass = torch.randn(batch, heads, n, g, device=device)
    dlse = torch.randn(batch, heads, n, device=device)
    tables = [None if t is None else t.to(device) for t in (rules.scale, rules.bias, rules.weight)]

    def reference(dt):
        args = [t.to(dt) for t in (q, k, v)]
        common = dict(q_groups=q_groups.expand(batch, n), k_groups=k_groups.expand(batch, n),
                      scale_table=tables[0], bias_table=tables[1], weight_table=tables[2],
                      num_groups=g)
        out, lse, mass = flow_attention_reference(*args, return_mass=True, **common)
        grads = flow_attention_reference_backward(dout.to(dt), dlse, dmass, *args, **common)
        return out, lse, mass, *grads

    truth = reference(torch.float32)
    lowprec = reference(dtype)
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    res = flow_attention(*leaves, q_groups, k_groups, rules=rules, return_lse=True,
                         return_mass=True)
    grads = torch.autograd.grad([res.out, res.lse, res.mass], leaves,
                                [dout.to(dtype), dlse, dmass])
    names = ("out", "lse", "mass", "dq", "dk", "dv")
    results = (res.out, res.lse, res.mass, *grads)
    for part, got, low, want in zip(names, results, lowprec, truth, strict=True):
        assert_within_rule(f"{name} {dtype} {part}", got, low, want, floor_for(dtype))


def _segments(sizes, device) -> torch.Tensor:
    return torch.cat([torch.full((s,), g, device=device) for g, s in enumerate(sizes)])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_flux_shape_forward_backward(shape, dtype):
    groups = _segments(SHAPES[shape], torch.device("cuda"))
    _check_against_reference(shape, groups, groups, kontext_rules(), 1, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_qwen_edit_shape_with_text_padding(dtype):
    """Qwen-Image-Edit at 1 MP, two prompts in a batch, the second padded by 40 tokens: key
    groups per batch element, the padding in a hidden group no query sees."""
    pytest.importorskip("diffusers")  # the Qwen-Image adapter builds on diffusers' model
    from ditflow.models.qwenimage import padded_key_groups

    text, image = 1390, 4096
    groups = _segments((text, image, image), torch.device("cuda")).int()
    mask = torch.ones(2, text, dtype=torch.bool, device="cuda")
    mask[1, -40:] = False
    rules = kontext_rules().with_hidden_group()
    keys = padded_key_groups(groups, mask, rules.num_groups - 1)
    _check_against_reference("qwen-edit-1024", groups, keys, rules, 2, dtype)
