"""Bad input gets a clear error naming the argument and what was expected."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import TRITON_DEVICE, TRITON_ON_CPU

from ditflow import FlowRules, TokenLayout, flow_attention


def qkv(b=1, n=8, h=2, d=16, dtype=torch.float32, device="cpu"):
    return [torch.randn(b, n, h, d, dtype=dtype, device=device) for _ in range(3)]


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda q, k, v: (q[0], k, v), ValueError, r"q: expected shape \[B, N, H, D\]"),
        (lambda q, k, v: (q, k[:, :, :1], v), ValueError, r"k: shape .* does not match q"),
        (lambda q, k, v: (q, k, v[:, :5]), ValueError, "k and v differ in length"),
        (lambda q, k, v: (q.long(), k, v), TypeError, "q: expected float16"),
        (lambda q, k, v: (q, k.half(), v), TypeError, "q, k, v must share a dtype"),
        (lambda q, k, v: (q, k, v.to("meta")), ValueError, "one device"),
        (lambda q, k, v: (q, k, [1, 2]), TypeError, "v: expected a tensor"),
    ],
)
def test_bad_qkv(mutate, error, match):
    with pytest.raises(error, match=match):
        flow_attention(*mutate(*qkv()))


def test_head_dim_limit():
    with pytest.raises(ValueError, match="head_dim 300"):
        flow_attention(*qkv(d=300))


def test_group_ids_out_of_range():
    rules = FlowRules(num_groups=3)
    with pytest.raises(ValueError, match=r"q_groups: group ids span \[0, 3\].*3 groups"):
        flow_attention(*qkv(), torch.tensor([0, 1, 2, 3, 0, 0, 0, 0]), rules=rules)
    with pytest.raises(ValueError, match=r"k_groups: group ids span \[-1, 0\]"):
        flow_attention(*qkv(), torch.zeros(8, dtype=torch.long),
                       torch.tensor([0] * 7 + [-1]), rules=rules)


def test_group_shape_and_dtype():
    rules = FlowRules(num_groups=2)
    with pytest.raises(ValueError, match=r"q_groups: expected shape \[8\] or \[1 or 1, 8\]"):
        flow_attention(*qkv(), torch.zeros(7, dtype=torch.long), rules=rules)
    with pytest.raises(TypeError, match="q_groups: expected an integer dtype"):
        flow_attention(*qkv(), torch.zeros(8), rules=rules)
    with pytest.raises(ValueError, match="k_groups is required when Nq != Nk"):
        q, k, v = qkv()
        flow_attention(q, k[:, :4], v[:, :4], torch.zeros(8, dtype=torch.long), rules=rules)


def test_rules_tables():
    with pytest.raises(ValueError, match=r"FlowRules scale: expected shape \[G, G\]"):
        FlowRules(scale=torch.ones(2, 3))
    with pytest.raises(ValueError, match="disagree on the number of groups"):
        FlowRules(scale=torch.ones(2, 2), bias=torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"supports 1\.\.16"):
        FlowRules(num_groups=17)
    with pytest.raises(ValueError, match=r"\+inf is not allowed"):
        FlowRules(bias=torch.full((2, 2), float("inf")))
    with pytest.raises(ValueError, match="weight: must be finite"):
        FlowRules(weight=torch.full((2, 2), float("inf")))
    with pytest.raises(TypeError, match="expected a floating tensor"):
        FlowRules(scale=torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"src=5: expected group ids in \[0, 3\)"):
        FlowRules(num_groups=3).block(5, 0)
    with pytest.raises(ValueError, match="per-head edits need num_heads"):
        FlowRules(num_groups=3).block(0, 1, heads=[0])
    with pytest.raises(ValueError, match="per head for 3 heads but q has 2"):
        flow_attention(*qkv(), rules=FlowRules(scale=torch.ones(3, 2, 2)))
    with pytest.raises(TypeError, match="rules: expected FlowRules"):
        flow_attention(*qkv(), rules=torch.ones(2, 2))


@pytest.mark.parametrize("shape", [(0, 2, 2), (0, 0), (3, 0, 0)])
def test_empty_tables_are_refused(shape):
    with pytest.raises(ValueError, match=r"FlowRules bias: shape .* is empty: expected at least "
                                         "one head and one group"):
        FlowRules(bias=torch.zeros(shape))


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda r: r.block(src=True, dst=0), r"src=True: expected group ids in \[0, 2\)"),
        (lambda r: r.block(src=0, dst=[False]), r"dst=\[False\]: expected group ids"),
        (lambda r: r.block(src=[], dst=0), r"src=\[\]: expected at least one group id"),
        (lambda r: r.block(0, 1, heads=[], num_heads=4),
         r"heads=\[\]: expected at least one head id"),
        (lambda r: r.block(0, 1, heads=[4], num_heads=4),
         r"heads=\[4\]: expected head ids in \[0, 4\)"),
        (lambda r: r.block(0, 1, num_heads=4), "num_heads=4 without heads=: name the heads"),
        (lambda r: r.block(0, 1, heads=0, num_heads=0), "num_heads=0: expected the model's"),
        (lambda r: r.with_hidden_group().block(0, 1, heads=3, num_heads=4).block(
            0, 1, heads=1, num_heads=2), "num_heads=2 but these rules are per head for 4 heads"),
    ],
    ids=["bool src", "bool dst", "no src", "no heads", "head out of range",
         "num_heads without heads", "zero num_heads", "other num_heads"],
)
def test_rule_edits(edit, match):
    with pytest.raises(ValueError, match=match):
        edit(FlowRules(num_groups=2))


def test_per_head_tables_edited_with_another_head_count():
    rules = FlowRules(bias=torch.zeros(2, 2, 2))
    with pytest.raises(ValueError, match="num_heads=4 but these rules are per head for 2 heads: "
                                         "pass num_heads=2 or leave it out"):
        rules.block(0, 1, heads=3, num_heads=4)
    edited = rules.block(0, 1, heads=1)  # the rules' own head count
    assert edited.num_heads == 2 and edited.bias[1, 0, 1] == float("-inf")
    assert edited.bias[0, 0, 1] == 0


@pytest.mark.parametrize("value", [torch.finfo(torch.float32).min, 3e38, -2e30])
def test_huge_finite_bias_is_refused(value):
    """Finite biases this large overflow the kernels' log2(e) scaling (-inf or NaN rows)."""
    with pytest.raises(ValueError, match=r"bias: finite values must lie within \+-1e\+30, got .*"
                                         "use -inf to block a pair"):
        FlowRules(num_groups=2).add_bias(1, [0, 1], value)
    FlowRules(num_groups=2).add_bias(1, [0, 1], -1e30).block(0, 1)  # the limit and -inf: fine


def test_fp16_inputs_refuse_weights_past_the_fp16_range():
    """The Triton kernels' weighted probabilities go through the P @ V dot in the inputs' dtype:
    a weight past 65504 would be inf (NaN out) with fp16 inputs there; the other backends
    compute in fp32 and take it."""
    rules = FlowRules(num_groups=1).weight_probs(0, 0, -1e5)
    assert rules.max_abs_weight == 1e5
    with pytest.raises(ValueError, match=r"rules: a weight of 100000 overflows the Triton "
                                         r"kernels' float16 products \(largest 65504\)"):
        flow_attention(*qkv(dtype=torch.float16, device=TRITON_DEVICE), rules=rules,
                       backend="triton")
    flow_attention(*qkv(device=TRITON_DEVICE), rules=rules, backend="triton")  # fp32 takes it
    flow_attention(*qkv(dtype=torch.float16), rules=rules, backend="reference")
    flow_attention(*qkv(dtype=torch.float16, device=TRITON_DEVICE), backend="triton",
                   rules=FlowRules(num_groups=1).weight_probs(0, 0, 65504.0))


def test_pair_mask():
    with pytest.raises(TypeError, match="pair_mask: expected a bool tensor"):
        flow_attention(*qkv(), pair_mask=torch.zeros(8, 8))
    with pytest.raises(ValueError, match=r"pair_mask: expected shape \[8, 8\]"):
        flow_attention(*qkv(), pair_mask=torch.zeros(8, 7, dtype=torch.bool))


def test_backend_choice(monkeypatch):
    with pytest.raises(ValueError, match="backend='cuda': expected one of"):
        flow_attention(*qkv(), backend="cuda")
    monkeypatch.setenv("DITFLOW_BACKEND", "nope")
    with pytest.raises(ValueError, match="backend='nope'"):
        flow_attention(*qkv())
    monkeypatch.delenv("DITFLOW_BACKEND")
    with pytest.raises(TypeError, match="float64 inputs run on backend='reference' only"):
        flow_attention(*qkv(dtype=torch.float64, device=TRITON_DEVICE), backend="triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="set TRITON_INTERPRET=1"):
            flow_attention(*qkv(), backend="triton")


def test_tensors_past_32_bit_offsets_are_refused_by_the_kernels():
    """2.4e9 elements (an expanded tensor: 512 bytes in memory); the kernels' offsets are
    32-bit, so the Triton backend refuses rather than touch the wrong memory."""
    q = torch.zeros(1, 1, 1, 128).expand(90, 8704, 24, 128)
    with pytest.raises(ValueError, match=r"q of shape \(90, 8704, 24, 128\) spans .* split"):
        flow_attention(q, q, q, backend="triton")


def test_bfloat16_on_the_triton_interpreter_is_refused(monkeypatch):
    """Triton's interpreter computes bf16 dots wrongly (errors of 1e8 in out): backend="triton"
    with bf16 CPU tensors is refused, naming what works; fp16 and fp32 there are right."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v = qkv(dtype=torch.bfloat16)
    for pinned in (dict(backend="triton"), {}):
        if not pinned:
            monkeypatch.setenv("DITFLOW_BACKEND", "triton")
        with pytest.raises(TypeError, match=r"Triton's interpreter, which mis-computes bfloat16:"
                                            r" use float16 or float32 .* backend='cpp' or "
                                            "'reference'"):
            flow_attention(q, k, v, **pinned)
    monkeypatch.delenv("DITFLOW_BACKEND")
    flow_attention(q, k, v, backend="reference")  # bf16 on the CPU's other backends: fine
    if TRITON_ON_CPU:  # the interpreter itself, for fp16
        want = flow_attention(q.float(), k.float(), v.float(), backend="reference").out
        got = flow_attention(q.half(), k.half(), v.half(), backend="triton").out
        torch.testing.assert_close(got.float(), want, atol=2e-3, rtol=2e-3)


def test_group_ids_without_rules_ask_for_rules():
    """Without rules there is one group; ids other than 0 are refused with what to pass, not
    blamed on rules never given."""
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    with pytest.raises(ValueError, match=r"q_groups: group ids other than 0 without rules: pass "
                                         r"rules=FlowRules\(num_groups=G\)"):
        flow_attention(*qkv(), groups)
    with pytest.raises(ValueError, match="k_groups: group ids other than 0 without rules"):
        flow_attention(*qkv(), torch.zeros(8, dtype=torch.long), groups)
    flow_attention(*qkv(), torch.zeros(8, dtype=torch.long))  # one group, every id 0: fine
    flow_attention(*qkv(), groups, rules=FlowRules(num_groups=2))


def test_rules_tables_read_back_are_copies():
    """Rules are immutable: writing to a table read from them changes neither the rules nor
    what the op computes (a write used to get past the NaN, +inf-bias and fp16 checks)."""
    rules = FlowRules(num_groups=2).weight_probs(0, 1, 0.5).add_bias(1, 0, 1.0)
    scaled = rules.scale_logits(0, 0, 2.0)
    inputs = (*qkv(), torch.tensor([0] * 4 + [1] * 4))
    before = [flow_attention(*inputs, rules=r).out for r in (rules, scaled)]
    rules.weight[0, 0, 1] = 7e4
    rules.bias[0, 0, 0] = float("inf")
    scaled.scale[0, 0, 0] = float("nan")
    assert rules.weight[0, 0, 1] == 0.5 and rules.bias[0, 0, 0] == 0
    assert scaled.scale[0, 0, 0] == 2 and rules.max_abs_weight == 1.0
    for r, want in zip((rules, scaled), before, strict=True):
        assert torch.equal(flow_attention(*inputs, rules=r).out, want)


@pytest.mark.parametrize("index", [np.int64(1), np.int32(1), torch.tensor(1), torch.tensor([1]),
                                   [np.int64(1)], torch.tensor([1], dtype=torch.int32),
                                   np.array([1])], ids=repr)
def test_rule_edits_take_numpy_and_tensor_ids(index):
    """Group and head ids are anything operator.index takes (numpy ints, one-element integer
    tensors), alone or in a list."""
    want = FlowRules(num_groups=2).weight_probs(1, 0, 0.5).block(0, 1, heads=1, num_heads=2)
    got = FlowRules(num_groups=2).weight_probs(index, 0, 0.5).block(0, index, heads=index,
                                                                     num_heads=2)
    assert torch.equal(got.weight, want.weight) and torch.equal(got.bias, want.bias)


@pytest.mark.parametrize("index", [torch.tensor(True), np.bool_(True), 1.0, torch.tensor(1.0),
                                   "1"], ids=repr)
def test_rule_edits_refuse_ids_that_are_no_integers(index):
    with pytest.raises(ValueError, match=r"src=.*: expected group ids in \[0, 2\)"):
        FlowRules(num_groups=2).block(index, 0)


def test_a_region_given_as_an_integer_mask_is_refused():
    """N integer 0/1 values are a mask (as from .long()), not N token indices: refused rather
    than moving tokens 0 and 1 (text) into the region."""
    layout = TokenLayout.from_segments(4, 6, 6)
    context = layout.mask("context")
    with pytest.raises(ValueError, match=r"with_region\('r'\): an integer 0/1 tensor of the "
                                         r"layout's length 16 .* pass a mask as bool"):
        layout.with_region("r", context.long())
    by_mask = layout.with_region("r", context)
    by_index = layout.with_region("r", context.nonzero()[:, 0])
    assert torch.equal(by_mask.groups(), by_index.groups())
    assert by_mask.mask("r").sum() == 6 and not by_mask.mask("r")[:4].any()
    # two tokens, indices [0, 1]: both tokens, as ever (a mask is no likelier)
    two = TokenLayout.from_segments(1, 1)
    assert two.with_region("r", torch.tensor([0, 1])).mask("r").all()
