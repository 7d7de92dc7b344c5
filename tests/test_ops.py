"""The registered torch.library ops: opcheck, torch.compile, caching of layouts."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import random_qkv, random_rules, segment_groups

from ditflow import flow_attention, functional, ops
from ditflow.layout import TokenLayout
from ditflow.rules import FlowRules


def _op_args(backend, device, dtype=torch.float32, with_mask=True):
    q, k, v = random_qkv(1, 37, 37, 2, 16, dtype, device)
    groups = segment_groups(37, 3, device).to(torch.int32)[None]
    rules = random_rules(3, {"scale", "bias", "block", "weight"})
    mask = torch.rand(1, 37, 37, device=device) < 0.2 if with_mask else None
    return (q, k, v, groups, groups, *rules.tables_on(device), mask, 0.25, 3, True, backend)


@pytest.mark.parametrize("backend", ["reference", "triton", "cpp"])
def test_opcheck_forward(backend, device):
    if backend == "cpp" and (device.type != "cpu" or not ops.cpp_available()):
        pytest.skip("the C++ kernels run on CPU and need DITFLOW_BUILD_EXT=1")
    torch.library.opcheck(ops.flow_attention_fwd, _op_args(backend, device))


def test_opcheck_backward(device):
    q, k, v, qg, kg, scale, bias, weight, mask, tau, groups, _, _ = _op_args("triton", device)
    q, k, v = q.detach(), k.detach(), v.detach()  # the backward op has no double backward
    out, lse, mass = ops.flow_attention_fwd(q, k, v, qg, kg, scale, bias, weight, mask, tau,
                                            groups, True, "triton")
    args = (torch.randn_like(out), torch.randn_like(lse), torch.randn_like(mass), q, k, v, out,
            lse, mass, qg, kg, scale, bias, weight, mask, tau, groups, "triton")
    torch.library.opcheck(ops.flow_attention_bwd, args)


def test_pack_pair_mask_sets_bit_j_mod_32_of_word_j_div_32():
    mask = torch.rand(2, 5, 77) < 0.5
    bits = ops.pack_pair_mask(mask)
    assert bits.dtype == torch.int32 and bits.shape == (2, 5, 3)
    shifts = torch.arange(32, dtype=torch.int32)
    unpacked = ((bits.unsqueeze(-1) >> shifts) & 1).flatten(-2).bool()
    assert torch.equal(unpacked[..., :77], mask) and not unpacked[..., 77:].any()


def test_reused_layout_is_converted_and_planned_once(device):
    q, k, v = random_qkv(1, 70, 70, 2, 16, torch.float32, device)
    groups = segment_groups(70, 2, device)
    rules = FlowRules(num_groups=2).scale_logits(0, 1, 2.0)
    flow_attention(q, k, v, groups, rules=rules, return_mass=True, backend="triton")
    misses = (ops._plans.misses, functional._converted_groups.misses)
    flow_attention(q, k, v, groups, rules=rules, return_mass=True, backend="triton")
    assert (ops._plans.misses, functional._converted_groups.misses) == misses
    groups.add_(0)  # an in-place change invalidates the cached conversion and plan
    flow_attention(q, k, v, groups, rules=rules, return_mass=True, backend="triton")
    assert ops._plans.misses > misses[0] and functional._converted_groups.misses > misses[1]


def test_rules_built_afresh_per_call_share_device_tables_and_plan(device):
    """An intervention may build equal rules for every block: their tables are copied to the
    device once (a blocking copy waits for the GPU) and the layout is planned once."""
    q, k, v = random_qkv(1, 70, 70, 2, 16, torch.float32, device)
    groups = segment_groups(70, 2, device)

    def rules():
        return FlowRules(num_groups=2).block(0, 1).scale_logits(1, 0, 2.0)

    assert all(a is b for a, b in zip(rules().tables_on(device), rules().tables_on(device),
                                      strict=True))
    flow_attention(q, k, v, groups, rules=rules(), backend="triton")
    misses = ops._plans.misses
    flow_attention(q, k, v, groups, rules=rules(), backend="triton")
    assert ops._plans.misses == misses


def test_a_new_pair_mask_is_planned_without_checking_the_group_ids_again(device, monkeypatch):
    """Group ids are read back (range check) once per layout, not with every new pair mask."""
    q, k, v = random_qkv(1, 70, 70, 2, 16, torch.float32, device)
    groups = segment_groups(70, 2, device)
    rules = FlowRules(num_groups=2).block(0, 1)
    checks = []
    monkeypatch.setattr(ops, "_check_group_ids", lambda *args: checks.append(args))
    for _ in range(2):
        mask = torch.rand(70, 70, device=device) < 0.2
        flow_attention(q, k, v, groups, rules=rules, pair_mask=mask, backend="triton")
    assert len(checks) == 1


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_compile_fullgraph(backend, device):
    """torch.compile(fullgraph=True) of a function calling the op: forward and gradients."""
    q, k, v = random_qkv(1, 40, 40, 2, 16, torch.float32, device)
    groups = segment_groups(40, 3, device)
    rules = random_rules(3, {"scale", "bias", "weight"})

    def loss(q, k, v):
        res = flow_attention(q, k, v, groups, rules=rules, return_mass=True, backend=backend)
        return res.out.square().sum() + res.mass[..., 2].sum()

    compiled = torch.compile(loss, fullgraph=True)
    want = torch.autograd.grad(loss(q, k, v), (q, k, v))
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_compiling_the_default_backend_choice_raises_no_dynamo_warning(monkeypatch):
    """The default backend asks once whether the C++ extension was built; compiled callers
    get that answer as a constant instead of Dynamo tracing through a cached import (which it
    warns about in every user's compile)."""
    import torch._dynamo.utils as dynamo_utils

    monkeypatch.setattr(dynamo_utils, "warn_once_cache", set())  # Dynamo warns once a process
    q = torch.randn(1, 24, 2, 16)
    compiled = torch.compile(lambda q: flow_attention(q, q, q, return_mass=True).mass,
                             fullgraph=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled(q)
    assert not [w for w in caught if "Dynamo" in str(w.message)]


def test_compiled_calls_reuse_plans_and_follow_in_place_changes(device):
    """Inside a compiled graph the op receives the caller's own group ids, rule tables and
    pair mask (no views made in the graph), so tile plans and packed masks are built once,
    also for the backward, and rebuilt after an in-place change of the layout."""
    q, k, v = random_qkv(1, 70, 70, 2, 16, torch.float32, device)
    groups = segment_groups(70, 3, device).to(torch.int32)
    mask = torch.rand(70, 70, device=device) < 0.1
    rules = random_rules(3, {"scale", "block"})

    def loss(q, k, v):
        res = flow_attention(q, k, v, groups, rules=rules, pair_mask=mask, return_mass=True,
                             backend="triton")
        return res.out.square().sum() + res.mass[..., 1].sum()

    compiled = torch.compile(loss, fullgraph=True)
    torch.autograd.grad(compiled(q, k, v), (q, k, v))
    misses = (ops._plans.misses, ops._packed_masks.misses)
    torch.autograd.grad(compiled(q, k, v), (q, k, v))
    assert (ops._plans.misses, ops._packed_masks.misses) == misses

    groups.copy_(groups.flip(0))
    mask[:, :9] = True
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    assert ops._plans.misses > misses[0] and ops._packed_masks.misses > misses[1]
    want = torch.autograd.grad(loss(q, k, v), (q, k, v))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def _backends_here(device):
    return ["reference", "triton"] + (
        ["cpp"] if device.type == "cpu" and ops.cpp_available() else [])


def _inference_copy(rules: FlowRules) -> FlowRules:
    return FlowRules(rules.scale.clone(), rules.bias.clone(), rules.weight.clone())


@pytest.mark.parametrize("layout_made", ["outside", "inside"])
def test_inference_mode_gives_the_results_of_grad_mode(layout_made, device):
    """Under torch.inference_mode, with group ids, pair mask and rules made inside or outside
    it, every backend gives what it gives outside (the caches keyed on them included)."""
    q, k, v = random_qkv(1, 37, 37, 2, 16, torch.float32, device, requires_grad=False)
    groups = segment_groups(37, 3, device)
    mask = torch.rand(37, 37, device=device) < 0.2
    rules = random_rules(3, {"scale", "bias", "block", "weight"})
    for backend in _backends_here(device):
        want = flow_attention(q, k, v, groups, rules=rules, pair_mask=mask, return_lse=True,
                              return_mass=True, backend=backend)
        with torch.inference_mode():
            layout = (groups, mask, rules) if layout_made == "outside" else (
                groups.clone(), mask.clone(), _inference_copy(rules))
            for _ in range(2):  # the second call finds what the first cached
                got = flow_attention(q, k, v, layout[0], rules=layout[2], pair_mask=layout[1],
                                     return_lse=True, return_mass=True, backend=backend)
                for actual, truth in zip(got, want, strict=True):
                    torch.testing.assert_close(actual, truth)


def test_rules_made_under_inference_mode_work_with_autograd_outside_it(device):
    """Their tables are normal tensors: autograd saves them for the backward."""
    q, k, v = random_qkv(1, 20, 20, 1, 16, torch.float32, device)
    groups = segment_groups(20, 2, device)
    with torch.inference_mode():
        rules = FlowRules(num_groups=2).scale_logits(0, 1, 1.5).add_bias(1, 0, 0.5)
    for backend in _backends_here(device):
        out = flow_attention(q, k, v, groups, rules=rules, backend=backend).out
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("groups_from", ["tensor made outside", "layout made inside"])
def test_inference_mode_calls_reuse_plans(groups_from, device):
    """A pipeline run under inference_mode: group ids made outside it (or a TokenLayout's,
    made inside it) and rules made inside it are checked and planned once, not per call."""
    q, k, v = random_qkv(1, 70, 70, 2, 16, torch.float32, device, requires_grad=False)
    outside = segment_groups(70, 3, device)
    with torch.inference_mode():
        groups = outside if groups_from == "tensor made outside" else (
            TokenLayout.from_segments(text=20, target=30, context=20).groups(device))
        rules = FlowRules(num_groups=3).block(0, 2).scale_logits(1, 0, 1.5)
        flow_attention(q, k, v, groups, rules=rules, return_mass=True, backend="triton")
        misses = (ops._plans.misses, functional._converted_groups.misses)
        flow_attention(q, k, v, groups, rules=rules, return_mass=True, backend="triton")
        assert (ops._plans.misses, functional._converted_groups.misses) == misses


@pytest.mark.parametrize("backend", ["reference", "triton", "cpp"])
def test_gradients_are_contiguous_for_transposed_inputs(backend, device):
    """The fake impls promise contiguous dq, dk, dv (and out) whatever the inputs' strides."""
    if backend not in _backends_here(device):
        pytest.skip("the C++ kernels run on CPU and need DITFLOW_BUILD_EXT=1")
    q, k, v = (torch.randn(1, 2, 37, 16, device=device).transpose(1, 2) for _ in range(3))
    out, lse, _ = ops.flow_attention_fwd(q, k, v, None, None, None, None, None, None, 0.25, 1,
                                         False, backend)
    grads = ops.flow_attention_bwd(torch.randn_like(out), None, None, q, k, v, out, lse, None,
                                   None, None, None, None, None, None, 0.25, 1, backend)
    assert all(t.is_contiguous() for t in (out, *grads))


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_compile_fullgraph_transposed_inputs(backend, device):
    """q, k, v made by transposing [B, H, N, D] inside the compiled function (the diffusers
    layout): the compiled gradients are the eager ones."""
    if backend not in _backends_here(device):
        pytest.skip("the C++ kernels run on CPU and need DITFLOW_BUILD_EXT=1")
    xq, xk, xv = (torch.randn(1, 2, 40, 16, device=device, requires_grad=True) for _ in range(3))
    groups = segment_groups(40, 2, device)
    rules = FlowRules(num_groups=2).scale_logits(0, 1, 1.5)

    def loss(xq, xk, xv):
        q, k, v = (2 * t.transpose(1, 2) for t in (xq, xk, xv))
        res = flow_attention(q, k, v, groups, rules=rules, return_mass=True, backend=backend)
        return res.out.square().sum() + res.mass[..., 1].sum()

    want = torch.autograd.grad(loss(xq, xk, xv), (xq, xk, xv))
    got = torch.autograd.grad(torch.compile(loss, fullgraph=True)(xq, xk, xv), (xq, xk, xv))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton", "cpp"])
def test_compiled_calls_check_group_ids(backend, device):
    """Under torch.compile flow_attention does not read the ids on the host; the ops refuse
    out-of-range ids (once per layout for the Triton kernels, where they plan it)."""
    if backend not in _backends_here(device):
        pytest.skip("the C++ kernels run on CPU and need DITFLOW_BUILD_EXT=1")
    q, k, v = random_qkv(1, 40, 40, 1, 16, torch.float32, device, requires_grad=False)
    groups = torch.tensor([0] * 20 + [1] * 19 + [9], device=device)
    rules = FlowRules(num_groups=2).weight_probs(0, 1, 0.5)
    compiled = torch.compile(
        lambda q, k, v: flow_attention(q, k, v, groups, rules=rules, backend=backend),
        fullgraph=True)
    with pytest.raises(ValueError, match=r"q_groups: group ids span \[0, 9\] but the rules "
                                         r"have 2 groups"):
        compiled(q, k, v)


def test_compiled_calls_check_ids_planned_for_more_groups(device):
    """A layout planned under rules of 10 groups is planned, and checked, again for rules of
    2: its ids may be fine for the first and out of range for the second."""
    q, k, v = random_qkv(1, 40, 40, 1, 16, torch.float32, device, requires_grad=False)
    groups = torch.tensor([0] * 20 + [1] * 19 + [9], device=device, dtype=torch.int32)

    def attend(q, k, v, rules):
        return flow_attention(q, k, v, groups, rules=rules, backend="triton").out

    compiled = torch.compile(attend, fullgraph=True)
    compiled(q, k, v, FlowRules(num_groups=10))
    with pytest.raises(ValueError, match=r"group ids span \[0, 9\] but the rules have 2"):
        compiled(q, k, v, FlowRules(num_groups=2))


@pytest.mark.parametrize("batch, nq, nk", [(1, 0, 5), (1, 5, 0), (0, 5, 5)],
                         ids=["Nq=0", "Nk=0", "B=0"])
def test_empty_inputs(batch, nq, nk, device):
    """Every backend: outputs of the right shapes, a row without keys is blocked (out 0,
    mass 0, lse -inf), gradients are zeros; with group ids, rules and a pair mask."""
    rules = FlowRules(num_groups=2).scale_logits(0, 1, 2.0).weight_probs(1, 0, 0.5)
    q_groups, k_groups = (torch.arange(n, device=device) % 2 for n in (nq, nk))
    mask = torch.zeros(nq, nk, dtype=torch.bool, device=device)
    for backend in _backends_here(device):
        q, k, v = random_qkv(batch, nq, nk, 2, 16, torch.float32, device)
        res = flow_attention(q, k, v, q_groups, k_groups, rules=rules, pair_mask=mask,
                             return_lse=True, return_mass=True, backend=backend)
        assert res.out.shape == q.shape and res.lse.shape == (batch, 2, nq)
        assert res.mass.shape == (batch, 2, nq, 2)
        assert (res.out == 0).all() and (res.mass == 0).all()
        if nk == 0:
            assert torch.isneginf(res.lse).all()
        loss = res.out.sum() + res.mass.sum() + torch.where(res.lse.isinf(), 0, res.lse).sum()
        grads = torch.autograd.grad(loss, (q, k, v))
        for grad, leaf in zip(grads, (q, k, v), strict=True):
            assert grad.shape == leaf.shape and (grad == 0).all(), backend
