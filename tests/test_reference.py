"""The specification itself: autograd, closed-form backward, and identities with plain PyTorch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import random_rules, segment_groups

from ditflow import FlowRules, flow_attention
from ditflow.reference import flow_attention_reference, flow_attention_reference_backward

ALL = {"scale", "bias", "block", "weight"}


def _qkv(b=2, nq=13, nk=11, h=2, d=8, dtype=torch.float64):
    return [torch.randn(b, n, h, d, dtype=dtype, requires_grad=True) for n in (nq, nk, nk)]


def _layout(nq, nk, num_groups, kinds, heads=None):
    rules = random_rules(num_groups, kinds, heads)
    qg = segment_groups(nq, num_groups, "cpu")[None]
    kg = segment_groups(nk, num_groups, "cpu")[None]
    return qg, kg, rules


def _tables(rules, dtype=torch.float64):
    return [None if t is None else t.to(dtype) for t in (rules.scale, rules.bias, rules.weight)]


# ids from sorted names: a set's own order changes with the hash seed, and pytest-xdist workers
# must collect the same ids
@pytest.mark.parametrize("kinds", [set(), {"scale"}, {"bias"}, {"weight"}, ALL],
                         ids=lambda kinds: "+".join(sorted(kinds)) or "none")
def test_gradcheck_reference(kinds):
    q, k, v = _qkv()
    qg, kg, rules = _layout(13, 11, 3, kinds)
    tables = _tables(rules)

    def fn(q, k, v):
        out, lse, mass = flow_attention_reference(q, k, v, qg, kg, *tables, None, None, 3, True)
        return out, torch.where(torch.isinf(lse), 0.0, lse), mass

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_gradcheck_op_reference_backend():
    """The registered op's autograd (closed-form backward) against finite differences."""
    q, k, v = _qkv(nq=9, nk=9)
    groups = segment_groups(9, 3, "cpu")
    rules = random_rules(3, ALL)
    mask = torch.rand(1, 9, 9) < 0.2

    def fn(q, k, v):
        r = flow_attention(q, k, v, groups, rules=rules, pair_mask=mask, return_lse=True,
                           return_mass=True, backend="reference")
        return r.out, torch.where(torch.isinf(r.lse), 0.0, r.lse), r.mass

    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("per_head", [False, True])
def test_closed_form_backward_matches_autograd(per_head):
    q, k, v = _qkv(nq=21, nk=17, h=3)
    qg, kg, rules = _layout(21, 17, 4, ALL, heads=3 if per_head else None)
    tables = _tables(rules)
    mask = torch.rand(2, 21, 17) < 0.15
    dout = torch.randn_like(q)
    dlse = torch.randn(2, 3, 21, dtype=torch.float64)
    dmass = torch.randn(2, 3, 21, 4, dtype=torch.float64)
    out, lse, mass = flow_attention_reference(q, k, v, qg, kg, *tables, mask, None, 4, True)
    lse_finite = torch.where(torch.isinf(lse), 0.0, lse)
    want = torch.autograd.grad([out, lse_finite, mass], (q, k, v), [dout, dlse, dmass])
    got = flow_attention_reference_backward(dout, dlse, dmass, q, k, v, qg, kg, *tables, mask,
                                            None, 4, chunk_size=5)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def test_chunking_does_not_change_results():
    q, k, v = _qkv(nq=31, nk=29)
    qg, kg, rules = _layout(31, 29, 3, ALL)
    tables = _tables(rules)
    whole = flow_attention_reference(q, k, v, qg, kg, *tables, None, None, 3, True)
    chunked = flow_attention_reference(q, k, v, qg, kg, *tables, None, None, 3, True,
                                       chunk_size=4)
    for a, b in zip(whole, chunked, strict=True):
        torch.testing.assert_close(a, b)


def test_no_rules_equals_sdpa():
    q, k, v = _qkv(nq=19, nk=23, dtype=torch.float32)
    out = flow_attention(q, k, v, backend="reference").out
    want = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
    torch.testing.assert_close(out, want.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_bias_table_equals_sdpa_with_dense_mask():
    q, k, v = _qkv(nq=19, nk=19, dtype=torch.float32)
    groups = segment_groups(19, 3, "cpu")
    bias = torch.randn(3, 3)
    rules = FlowRules(bias=bias)
    out = flow_attention(q, k, v, groups, rules=rules, backend="reference").out
    dense = bias[groups[:, None], groups[None, :]]  # [Nq, Nk] float mask
    want = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)),
                                          attn_mask=dense)
    torch.testing.assert_close(out, want.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_mass_sums_to_row_weight():
    """Without weights mass sums to 1 per row; with weights to the row's total weight."""
    q, k, v = _qkv(nq=15, nk=15)
    groups = segment_groups(15, 4, "cpu")
    plain = flow_attention(q, k, v, groups, rules=FlowRules(num_groups=4), return_mass=True,
                           backend="reference")
    torch.testing.assert_close(plain.mass.sum(-1), torch.ones_like(plain.mass[..., 0]))
    rules = FlowRules(num_groups=4).weight_probs(0, [1, 2], 0.5).weight_probs(3, 3, 2.0)
    weighted = flow_attention(q, k, v, groups, rules=rules, return_mass=True,
                              backend="reference")
    factor = rules.weight[0][groups][:, groups].to(torch.float64)  # [Nq, Nk]
    s = torch.einsum("bihd,bjhd->bhij", q, k) * q.shape[-1] ** -0.5
    want = (torch.softmax(s, -1) * factor).sum(-1)
    torch.testing.assert_close(weighted.mass.sum(-1).double(), want.detach())


def test_mass_of_segment_equals_lse_difference():
    """mass on a contiguous key segment = exp(lse over that segment - lse over all keys)."""
    q, k, v = _qkv(nq=12, nk=20)
    kg = torch.tensor([0] * 8 + [1] * 12)
    qg = torch.zeros(12, dtype=torch.long)
    res = flow_attention(q, k, v, qg, kg, rules=FlowRules(num_groups=2), return_lse=True,
                         return_mass=True, backend="reference")
    segment = flow_attention(q, k[:, 8:], v[:, 8:], return_lse=True, backend="reference")
    torch.testing.assert_close(res.mass[..., 1], torch.exp(segment.lse - res.lse))
