"""CPU-measurable timings (pytest-benchmark), so regressions show on any machine.

    make bench        # or: TRITON_INTERPRET=1 pytest benchmarks --benchmark-enable

The reference at a small Kontext-like layout, forward and forward+backward; the C++ kernels
against the reference at N = 1024, 2048, 4096 (forward + backward; peak memory needs a fresh
process per case: ``python -m benchmarks.cpu_kernel``); the Triton kernels through the
interpreter at a tiny size (the interpreter's speed is not the GPU's: this tracks the
Python-side cost of planning and launching).
"""

from __future__ import annotations

import os

import pytest
import torch

from ditflow import FlowRules, flow_attention
from ditflow.ops import cpp_available

TEXT, TARGET, CONTEXT = 0, 1, 2


def _layout(text, target, context, heads=4, head_dim=64):
    groups = torch.tensor([TEXT] * text + [TARGET] * target + [CONTEXT] * context)
    n = groups.numel()
    q, k, v = (torch.randn(1, n, heads, head_dim, requires_grad=True) for _ in range(3))
    rules = FlowRules(num_groups=3).weight_probs([TEXT, TARGET], CONTEXT, 0.4)
    return q, k, v, groups, rules


@pytest.mark.parametrize("direction", ["forward", "forward+backward"])
def test_reference_kontext_like(benchmark, direction):
    q, k, v, groups, rules = _layout(64, 256, 256)

    def run():
        res = flow_attention(q, k, v, groups, rules=rules, return_mass=True,
                             backend="reference")
        if direction == "forward+backward":
            torch.autograd.grad([res.out, res.mass], (q, k, v),
                                [torch.ones_like(res.out), torch.ones_like(res.mass)])

    benchmark(run)


@pytest.mark.parametrize("n", [1024, 2048, 4096])
@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_cpu_backends_forward_backward(benchmark, backend, n):
    if backend == "cpp" and not cpp_available():
        pytest.skip("the C++ extension is not built (DITFLOW_BUILD_EXT=1, see README)")
    q, k, v, groups, rules = _layout(n // 8, (n - n // 8) // 2, n - n // 8 - (n - n // 8) // 2)

    def run():
        res = flow_attention(q, k, v, groups, rules=rules, return_mass=True, backend=backend)
        torch.autograd.grad([res.out, res.mass], (q, k, v),
                            [torch.ones_like(res.out), torch.ones_like(res.mass)])

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
def test_triton_interpreter_tiny(benchmark):
    q, k, v, groups, rules = _layout(16, 32, 32, heads=1, head_dim=16)
    with torch.no_grad():
        benchmark(lambda: flow_attention(q, k, v, groups, rules=rules, return_mass=True,
                                         backend="triton"))
