"""Compiled kernels at real FLUX Kontext shapes (GPU only): bf16/fp16, forward and backward.

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
# (text, target, context) token counts: Kontext at 512² and 1024²
SHAPES = {"kontext-512": (512, 1024, 1024), "kontext-1024": (512, 4096, 4096)}


def kontext_rules() -> FlowRules:
    """Every rule kind on a real layout: context damped, text boosted, one head pair blocked."""
    return (FlowRules(num_groups=3)
            .weight_probs([TEXT, TARGET], CONTEXT, 0.4)
            .scale_logits(TARGET, TEXT, 1.05)
            .add_bias(TARGET, TARGET, 0.1)
            .block(TEXT, CONTEXT, heads=[0, 5], num_heads=24))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_flux_shape_forward_backward(shape, dtype):
    device = torch.device("cuda")
    sizes = SHAPES[shape]
    n, heads, head_dim = sum(sizes), 24, 128
    groups = torch.cat([torch.full((s,), g, device=device) for g, s in enumerate(sizes)])
    rules = kontext_rules()
    q, k, v = (torch.randn(1, n, heads, head_dim, device=device) for _ in range(3))
    dout = torch.randn(1, n, heads, head_dim, device=device)
    dmass = torch.randn(1, heads, n, 3, device=device)
    dlse = torch.randn(1, heads, n, device=device)
    tables = [None if t is None else t.to(device) for t in (rules.scale, rules.bias, rules.weight)]

    def reference(dt):
        args = [t.to(dt) for t in (q, k, v)]
        common = dict(q_groups=groups[None], k_groups=groups[None], scale_table=tables[0],
                      bias_table=tables[1], weight_table=tables[2], num_groups=3)
        out, lse, mass = flow_attention_reference(*args, return_mass=True, **common)
        grads = flow_attention_reference_backward(dout.to(dt), dlse, dmass, *args, **common)
        return out, lse, mass, *grads

    truth = reference(torch.float32)
    lowprec = reference(dtype)
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    res = flow_attention(*leaves, groups, rules=rules, return_lse=True, return_mass=True)
    grads = torch.autograd.grad([res.out, res.lse, res.mass], leaves,
                                [dout.to(dtype), dlse, dmass])
    names = ("out", "lse", "mass", "dq", "dk", "dv")
    results = (res.out, res.lse, res.mass, *grads)
    for name, got, low, want in zip(names, results, lowprec, truth, strict=True):
        assert_within_rule(f"{shape} {dtype} {name}", got, low, want, floor_for(dtype))
