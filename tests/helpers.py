"""Shared test helpers: random layouts, the tolerance rule, a loss over all outputs."""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ditflow import FlowRules

# Where tests can run backend="triton": CUDA tensors on a GPU, else CPU tensors in Triton's
# interpreter (conftest turns it on without a GPU). Tests that compare the kernels on CPU
# tensors against a CPU computation run only in the interpreter; on a GPU the compiled
# kernels are compared on the device (test_flow_attention, test_gpu_flux_shapes).
TRITON_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TRITON_ON_CPU = os.environ.get("TRITON_INTERPRET") == "1"
needs_triton_on_cpu = pytest.mark.skipif(
    not TRITON_ON_CPU, reason="Triton on CPU tensors runs in the interpreter (TRITON_INTERPRET=1)")


class HostReads(TorchDispatchMode):
    """Records the ops that, on a GPU, wait for it: reads of tensor data on the host (.item(),
    bool(), nonzero and bool-mask indexing, whose output size is data) and host data made into
    tensors (torch.tensor: a blocking host-to-device copy)."""

    SYNCS = frozenset({"aten._local_scalar_dense", "aten.nonzero", "aten.equal",
                       "aten.is_nonzero", "aten.masked_select", "aten.lift_fresh"})
    INDEXING = frozenset({"aten.index", "aten.index_put", "aten.index_put_"})

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in self.SYNCS or (name in self.INDEXING and any(
                i is not None and i.dtype == torch.bool for i in args[1])):
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def random_qkv(batch, nq, nk, heads, head_dim, dtype, device, requires_grad=True):
    def make(n):
        return torch.randn(batch, n, heads, head_dim, device=device).to(dtype).requires_grad_(
            requires_grad)

    return make(nq), make(nk), make(nk)


def segment_groups(n: int, num_groups: int, device, shuffle: bool = False) -> torch.Tensor:
    """Contiguous segments of random lengths (MM-DiT-like), or scattered ids when shuffle.
    Every group is non-empty when n >= num_groups."""
    if shuffle:
        return torch.randint(0, num_groups, (n,), device=device)
    if n >= num_groups:
        cuts = torch.sort(torch.randperm(n - 1)[: num_groups - 1] + 1).values
    else:
        cuts = torch.sort(torch.randint(0, n + 1, (num_groups - 1,))).values
    ids = torch.zeros(n, dtype=torch.long)
    for cut in cuts:
        ids[cut:] += 1
    return ids.to(device)


def random_rules(num_groups: int, kinds: set[str], heads: int | None = None) -> FlowRules:
    """Random tables of the requested kinds ('scale', 'bias', 'block', 'weight')."""
    shape = (num_groups, num_groups) if heads is None else (heads, num_groups, num_groups)
    tables = {}
    if "scale" in kinds:
        tables["scale"] = torch.rand(shape) * 1.5 + 0.25
    if "bias" in kinds or "block" in kinds:
        bias = torch.randn(shape) if "bias" in kinds else torch.zeros(shape)
        if "block" in kinds:  # at least one blocked pair (a random 3x3 draw may have none)
            blocked = torch.rand(shape) < 0.3
            blocked[..., 0, -1] = num_groups > 1
            bias = bias.masked_fill(blocked, float("-inf"))
        tables["bias"] = bias
    if "weight" in kinds:
        tables["weight"] = torch.rand(shape) * 2
    return FlowRules(**tables, num_groups=num_groups)


def max_error(actual: torch.Tensor, truth: torch.Tensor) -> float:
    """Max abs error; infinities must sit at the same places with the same sign."""
    actual, truth = actual.double(), truth.double()
    assert not torch.isnan(actual).any(), "NaN in result"
    finite = torch.isfinite(truth)
    assert torch.equal(torch.isfinite(actual), finite), "infinities differ from the truth"
    assert torch.equal(actual[~finite], truth[~finite]), "infinities differ in sign"
    return (actual[finite] - truth[finite]).abs().max().item() if finite.any() else 0.0


def assert_within_rule(name, actual, lowprec, truth, floor):
    """flash-attention's rule: error <= 2x the error of plain low-precision PyTorch + floor."""
    err = max_error(actual, truth)
    bound = 2 * max_error(lowprec, truth) + floor
    assert err <= bound, f"{name}: error {err:.3e} > bound {bound:.3e}"


def floor_for(dtype: torch.dtype) -> float:
    return {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]


def weighted_loss(result, cotangents):
    """A scalar whose gradient feeds random cotangents into out, lse (finite rows) and mass."""
    dout, dlse, dmass = cotangents
    loss = (result.out.double() * dout).sum()
    if result.lse is not None:
        lse = result.lse.double()
        loss = loss + (torch.where(torch.isinf(lse), 0.0, lse) * dlse).sum()
    if result.mass is not None:
        loss = loss + (result.mass.double() * dmass).sum()
    return loss


def assert_compiled_matches_eager(model, inputs: dict, intervention) -> None:
    """``torch.compile(model)`` under ``intervention()`` (fresh per attach) gives the eager
    output; recording r_ctx over three steps compiles once (no recompile per step) and records
    what eager recording does."""
    from torch._dynamo.utils import counters

    from ditflow.session import StatsRecorder, attach

    torch._dynamo.reset()
    compiled = torch.compile(model)
    steps = [torch.tensor([t]) for t in (0.9, 0.8, 0.7)]
    with attach(model, intervention()):
        want = model(**{**inputs, "timestep": steps[0]})[0]
    with attach(compiled, intervention()):  # attaching to the compiled wrapper works too
        got = compiled(**{**inputs, "timestep": steps[0]})[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    eager, compiled_r = StatsRecorder(), StatsRecorder()
    with attach(model, compiled_r):
        compiled(**{**inputs, "timestep": steps[0]})  # warm: compiles the mass variant
        graphs = counters["stats"]["unique_graphs"]
        for t in steps[1:]:
            compiled(**{**inputs, "timestep": t})
    assert counters["stats"]["unique_graphs"] == graphs, "recompiled for a new step"
    with attach(model, eager):
        for t in steps:
            model(**{**inputs, "timestep": t})
    assert compiled_r.r_ctx.keys() == eager.r_ctx.keys()
    for key in eager.r_ctx:
        torch.testing.assert_close(compiled_r.r_ctx[key], eager.r_ctx[key])


def rules_everywhere(rules_of):
    """An intervention applying ``rules_of(layout)`` in every block at every step."""
    from ditflow.session import Intervention

    class RulesEverywhere(Intervention):
        def rules(self, step, block, layout):
            return rules_of(layout)

    return RulesEverywhere()


def edit_rules(layout):
    """Rules of every kind on an edit's groups: context probabilities damped for text and
    target queries, target-to-text logits scaled, target-to-target logits biased."""
    from ditflow.layout import CONTEXT, TARGET, TEXT

    return (layout.rules().weight_probs([TEXT, TARGET], CONTEXT, 0.3)
            .scale_logits(TARGET, TEXT, 1.2).add_bias(TARGET, TARGET, 0.5))


def assert_checkpointing_keeps_the_gradient(model, inputs: dict, blocks: list[str]) -> None:
    """The early-stopped r_ctx loss over ``blocks`` has the same input gradient with and
    without gradient checkpointing: the recomputation in backward re-runs the stopping block
    without stopping again."""
    from ditflow.session import StatsRecorder, attach

    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.enable_gradient_checkpointing()
        latents = inputs["hidden_states"].clone().requires_grad_()
        recorder = StatsRecorder(blocks=blocks, stop_after_last=True)
        with torch.enable_grad(), attach(model, recorder) as session:
            session.forward(**{**inputs, "hidden_states": latents})
            (grad,) = torch.autograd.grad(recorder.mean_r_ctx().sum(), latents)
        grads.append(grad)
    model.disable_gradient_checkpointing()
    torch.testing.assert_close(grads[1], grads[0])
    assert grads[0].abs().sum() > 0


def assert_statistics_only_is_stock(model, inputs: dict, blocks: int, tol: float) -> None:
    """Recording mass in every one of the model's ``blocks`` blocks (flow attention everywhere,
    identity rules) leaves the stock output, within ``tol`` relative to its largest value."""
    from ditflow.session import StatsRecorder, attach

    stock = model(**inputs)[0]
    recorder = StatsRecorder()
    with attach(model, recorder) as session:
        ours = model(**inputs)[0]
    assert len(recorder.r_ctx) == blocks and session.blocks_run == blocks
    err = (ours.float() - stock.float()).abs().max() / stock.float().abs().max()
    assert err <= tol


def eager_r_ctx(model, inputs: dict, module, layout) -> list:
    """r_ctx of every block from explicit softmax probabilities of target queries over all keys
    (those the model's own mask lets through), computed by the model's own processors with
    ``module.dispatch_attention_fn`` replaced by an eager probe."""
    target, context = layout.mask("target"), layout.mask("context")
    ratios = []

    def probe(query, key, value, attn_mask=None, **kwargs):
        scores = torch.einsum("bihd,bjhd->bhij", query, key) * query.shape[-1] ** -0.5
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        probs = scores.softmax(dim=-1)
        ratios.append(probs[:, :, target][..., context].sum(-1).mean(dim=(1, 2)))
        return torch.einsum("bhij,bjhd->bihd", probs, value)

    original = module.dispatch_attention_fn
    module.dispatch_attention_fn = probe
    try:
        model(**inputs)
    finally:
        module.dispatch_attention_fn = original
    return ratios


def assert_early_stop_saves_blocks(model, inputs: dict, block: str, blocks: tuple[int, int],
                                   target_tokens: int) -> None:
    """Recording r_ctx at ``block`` with early stop runs ``blocks[1]`` blocks instead of all
    ``blocks[0]``, with the same r_ctx and input gradient as the full pass; the gradient
    reaches the context latents (after ``target_tokens``)."""
    from ditflow.session import StatsRecorder, attach

    runs = {}
    for stop in (False, True):
        latents = inputs["hidden_states"].clone().requires_grad_()
        recorder = StatsRecorder(blocks=[block], stop_after_last=stop)
        with attach(model, recorder) as session:
            output = session.forward(**{**inputs, "hidden_states": latents})
            (grad,) = torch.autograd.grad(recorder.mean_r_ctx().sum(), latents)
        runs[stop] = (session.blocks_run, output is None, recorder.r_ctx[(0, block)], grad)
    assert runs[False][:2] == (blocks[0], False) and runs[True][:2] == (blocks[1], True)
    torch.testing.assert_close(runs[True][2], runs[False][2])
    torch.testing.assert_close(runs[True][3], runs[False][3])
    assert runs[True][3][:, target_tokens:].abs().sum() > 0


def assert_triton_matches_reference(model, inputs: dict, target_tokens: int,
                                    monkeypatch) -> None:
    """Under :func:`edit_rules` in every block, the Triton kernels (the interpreter on a CPU)
    and the reference behind the same processors give the same output and the same gradient
    of a loss on the target tokens with respect to the context latents (after
    ``target_tokens``), which is not zero."""
    from ditflow.session import attach

    if not TRITON_ON_CPU:
        pytest.skip("Triton on CPU tensors runs in the interpreter (TRITON_INTERPRET=1)")
    results = {}
    for backend in ("triton", "reference"):
        monkeypatch.setenv("DITFLOW_BACKEND", backend)
        latents = inputs["hidden_states"].clone().requires_grad_()
        with attach(model, rules_everywhere(edit_rules)):
            out = model(**{**inputs, "hidden_states": latents})[0]
        (grad,) = torch.autograd.grad(out[:, :target_tokens].square().sum(), latents)
        results[backend] = (out, grad[:, target_tokens:])
    for got, want in zip(results["triton"], results["reference"], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert results["reference"][1].abs().sum() > 0


def assert_rules_and_pair_masks_reach_the_attention(model, inputs: dict) -> None:
    """Through the model's processors, a rule means what it says (blocking target -> context
    leaves the target queries no mass on the context, and only them) and a pair mask blocking
    the same pairs gives the same output: checked against the attention's own statistics,
    not against another backend behind the same processor."""
    from ditflow.layout import CONTEXT, TARGET
    from ditflow.session import Intervention, attach

    class Blocking(Intervention):
        def __init__(self, by_mask: bool):
            self.by_mask, self.observed = by_mask, []

        def rules(self, step, block, layout):
            return None if self.by_mask else layout.rules().block(TARGET, CONTEXT)

        def pair_mask(self, step, block, layout, q, k):
            if not self.by_mask:
                return None
            groups = layout.groups(q.device)
            return ((groups == TARGET)[:, None] & (groups == CONTEXT)[None, :])[None]

        def wants_mass(self, step, block):
            return True

        def observe(self, step, block, layout, result):
            self.observed.append((layout.groups(result.mass.device), result.mass))

    outputs = []
    for by_mask in (False, True):
        blocking = Blocking(by_mask)
        with attach(model, blocking):
            outputs.append(model(**inputs)[0])
        assert blocking.observed
        for groups, mass in blocking.observed:
            on_context = mass[..., CONTEXT]
            assert (on_context[:, :, groups == TARGET] == 0).all()
            assert (on_context[:, :, groups != TARGET] > 0).any()  # the others still see it
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-5)


def done_lines(folder) -> list[dict]:
    """A protect run's manifest lines of finished or failed photos (not those saying one
    started)."""
    import json

    lines = (folder / "manifest.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["status"] != "started"]
