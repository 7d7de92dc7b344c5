"""The optional C++ CPU kernels (csrc/) against the reference, and the fallback without them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from test_flow_attention import ALL, CASES, Case, run_case

from ditflow import flow_attention, ops
from ditflow.functional import resolve_backend

needs_extension = pytest.mark.skipif(not ops.cpp_available(),
                                     reason="C++ extension not built (DITFLOW_BUILD_EXT=1)")


def test_extension_is_built_when_asked():
    if os.environ.get("DITFLOW_BUILD_EXT") != "1":
        pytest.skip("the extension was not requested")
    assert ops.cpp_available(), "DITFLOW_BUILD_EXT=1 but ditflow._C did not import"


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_cpp_matches_reference(case, dtype):
    run_case(case, dtype, torch.device("cpu"), backend="cpp")


# Group segments longer than a tile's 64 queries and sequences longer than its widest 1024 keys:
# tiles hold several runs of key groups (the rules are applied run by run) and rows span several
# key tiles, whatever tile width the kernel picks for the thread count.
LONG_SEGMENT_CASES = [
    Case(400, head_dim=16, groups=3, kinds=ALL),
    Case(400, head_dim=16, groups=3, kinds=ALL, per_head=True, heads=3),
    Case(300, 520, head_dim=16, groups=3, kinds=ALL),
    Case(400, head_dim=16, groups=3, kinds=frozenset({"block"}), per_head=True, heads=3),
    Case(300, 520, head_dim=16, groups=3, kinds=ALL, pair_mask=True, per_batch_groups=True),
    Case(200, 1100, head_dim=16, groups=4, kinds=ALL),
]


@needs_extension
@pytest.mark.parametrize("case", LONG_SEGMENT_CASES, ids=str)
def test_cpp_long_segments_match_reference(case):
    run_case(case, torch.float32, torch.device("cpu"), backend="cpp")


@needs_extension
def test_cpp_is_the_cpu_default_and_fp64_falls_back():
    assert resolve_backend(None, torch.device("cpu")) == "cpp"
    q = torch.randn(1, 9, 1, 8, dtype=torch.float64)
    out = flow_attention(q, q, q).out  # fp64: the reference, the only exact path
    assert out.dtype == torch.float64


def test_fallback_without_the_extension(monkeypatch):
    monkeypatch.setattr(ops, "cpp_available", lambda: False)
    assert resolve_backend(None, torch.device("cpu")) == "reference"
    with pytest.raises(ValueError, match="DITFLOW_BUILD_EXT=1"):
        resolve_backend("cpp", torch.device("cpu"))
    q = torch.randn(1, 9, 1, 8)
    torch.testing.assert_close(flow_attention(q, q, q).out,
                               flow_attention(q, q, q, backend="reference").out)
    with pytest.raises(RuntimeError, match=r"backend='cpp' needs the C\+\+ extension"):
        ops.flow_attention_fwd(q, q, q, None, None, None, None, None, None, 0.25, 1, False, "cpp")


@needs_extension
def test_the_ops_load_the_extension_themselves():
    """Calling the registered ops with backend='cpp' directly, in a fresh interpreter where
    nothing imported ditflow._C before."""
    script = (
        "import sys, torch\n"
        "from ditflow import ops\n"
        "assert 'ditflow._C' not in sys.modules\n"
        "q = torch.randn(1, 8, 1, 16)\n"
        "out, lse, _ = ops.flow_attention_fwd(q, q, q, None, None, None, None, None, None, 0.25,"
        " 1, False, 'cpp')\n"
        "ops.flow_attention_bwd(out, None, None, q, q, q, out, lse, None, None, None, None, None,"
        " None, None, 0.25, 1, 'cpp')\n")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
