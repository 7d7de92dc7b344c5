"""GPU sweep: flow attention against the eager reference, SDPA backends and FlexAttention.

Every provider runs in this one process on the same random inputs; each is checked against an
fp32 reference before it is timed. Usage::

    python -m benchmarks.attention --shape kontext-1024 --dtype bf16 --out benchmarks/results

Prints a table last and writes ``attention-<device>-<date>.json`` (with device, versions, git
commit and the command) under ``--out``. OOM is recorded as NaN, not a crash.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.results import save
from ditflow import FlowRules, flow_attention
from ditflow.reference import flow_attention_reference

TEXT, TARGET, CONTEXT = 0, 1, 2
# (text, target, context) tokens; heads 24, head_dim 128 for all FLUX-family models
SHAPES = {
    "flux-1024": (512, 4096, 0),
    "kontext-512": (512, 1024, 1024),
    "step1x-512": (640, 1024, 1024),
    "kontext-1024": (512, 4096, 4096),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def uvr_like_rules() -> FlowRules:
    """Rules of the kind the methods use: context damped after the softmax, text scaled."""
    return (FlowRules(num_groups=3)
            .weight_probs([TEXT, TARGET], CONTEXT, 0.4)
            .scale_logits(TARGET, [TEXT, TARGET], 1.05))


def _bench(fn: Callable[[], object]) -> tuple[float, float]:
    """(median ms, peak MiB above the memory held before the call)."""
    import triton.testing

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    ms = triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
    return ms, peak


def _flex_providers(q, k, v, groups, rules):
    """FlexAttention with the same logit rules (score_mod) and LSE; the post-softmax weight has
    no FlexAttention equivalent, so it is timed with scale only (documented in the table)."""
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:
        return {}
    flex = torch.compile(flex_attention, dynamic=False)
    scale_table = rules.tables_on(q.device)[0]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))

    def score_mod(score, b, h, q_idx, kv_idx):
        return score * scale_table[0, groups[q_idx], groups[kv_idx]]

    def plain():
        return flex(qt, kt, vt)

    def ruled():
        return flex(qt, kt, vt, score_mod=score_mod, return_lse=True)

    return {"flex (plain)": plain, "flex (scale rules + lse)": ruled}


def _sdpa_providers(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    out = {}
    for name, backend in (("sdpa flash", SDPBackend.FLASH_ATTENTION),
                          ("sdpa cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("sdpa efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def run(backend=backend):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)
        out[name] = run
    return out


def _flash_attn_provider(q, k, v):
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return {}
    return {"flash-attn": lambda: flash_attn_func(q, k, v)}


def _eager_reference(q, k, v, groups, rules, return_mass):
    """What the methods' public code does: materialise every score (no chunking)."""
    tables = rules.tables_on(q.device)
    n = q.shape[1]

    def run():
        return flow_attention_reference(
            q, k, v, groups[None], groups[None], *tables, None, None, rules.num_groups,
            return_mass, chunk_size=n)
    return run


def _first(result):
    return result[0] if isinstance(result, tuple | list) else result


def _problem(shape: str, dtype: torch.dtype, requires_grad: bool = False):
    """Random q, k, v and group ids for a named shape (B=1, 24 heads x 128), and the forward
    FLOP count."""
    sizes = SHAPES[shape]
    n, heads, head_dim = sum(sizes), 24, 128
    groups = torch.cat([torch.full((s,), g, device="cuda", dtype=torch.int32)
                        for g, s in enumerate(sizes)])
    q, k, v = (torch.randn(1, n, heads, head_dim, device="cuda", dtype=dtype,
                           requires_grad=requires_grad) for _ in range(3))
    return n, groups, q, k, v, 4 * heads * n * n * head_dim


def _max_error(result, truth: torch.Tensor) -> float:
    result = _first(result)
    result = result.out if hasattr(result, "out") else result
    if result.shape != truth.shape:  # [B, H, N, D] providers
        result = result.transpose(1, 2)
    return (result.float() - truth).abs().max().item()


def _timed(row: dict, fn: Callable[[], object], flops: float,
           truth: torch.Tensor | None = None) -> dict:
    """Fill max error (against ``truth``), ms, TFLOP/s and peak MiB into ``row``; a failure is
    recorded as NaN with a note."""
    try:
        if truth is not None:
            row["max_err"] = _max_error(fn(), truth)
        row["ms"], row["peak_mib"] = _bench(fn)
        row["tflops"] = flops / row["ms"] / 1e9
    except Exception as exc:  # OOM or a provider that cannot run here: recorded, not fatal
        note = "OOM" if isinstance(exc, torch.OutOfMemoryError) else (
            f"{type(exc).__name__}: {str(exc)[:200]}")
        row.update(ms=math.nan, peak_mib=math.nan, tflops=math.nan, note=note)
    torch.cuda.empty_cache()
    return row


def run_shape(shape: str, dtype: torch.dtype, backward: bool, rows: list[dict]):
    torch._dynamo.reset()  # FlexAttention recompiles per shape; stay under the recompile limit
    device = torch.device("cuda")
    n, groups, q, k, v, flops_fwd = _problem(shape, dtype)
    heads = q.shape[2]
    rules = uvr_like_rules()
    plain_rules = FlowRules(num_groups=3)

    with torch.no_grad():
        truth_plain = flow_attention_reference(q.float(), k.float(), v.float())[0]
        truth_rules = flow_attention_reference(
            q.float(), k.float(), v.float(), groups[None], groups[None],
            *rules.tables_on(device), None, None, 3, True)

    forward: dict[str, tuple[Callable, torch.Tensor | None]] = {
        "ditflow (no rules)": (lambda: flow_attention(q, k, v), truth_plain),
        "ditflow (rules + mass)": (
            lambda: flow_attention(q, k, v, groups, rules=rules, return_mass=True,
                                   return_lse=True), truth_rules[0]),
        "ditflow (mass only)": (
            lambda: flow_attention(q, k, v, groups, rules=plain_rules, return_mass=True),
            truth_plain),
        "eager reference (rules + mass)": (
            _eager_reference(q, k, v, groups, rules, True), truth_rules[0]),
    }
    for name, fn in {**_sdpa_providers(q, k, v), **_flash_attn_provider(q, k, v)}.items():
        forward[name] = (fn, truth_plain)
    for name, fn in _flex_providers(q, k, v, groups, rules).items():
        forward[name] = (fn, None)

    for name, (fn, truth) in forward.items():
        row = dict(shape=shape, n=n, dtype=str(dtype).removeprefix("torch."), provider=name,
                   direction="forward")
        with torch.no_grad():
            rows.append(_timed(row, fn, flops_fwd, truth))

    if not backward:
        return
    dout = torch.randn_like(q)
    dmass = torch.randn(1, heads, n, 3, device=device)
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))

    def ditflow_rules_bwd():
        res = flow_attention(qg, kg, vg, groups, rules=rules, return_mass=True)
        return torch.autograd.grad([res.out, res.mass], (qg, kg, vg), [dout, dmass])

    def ditflow_plain_bwd():
        return torch.autograd.grad(flow_attention(qg, kg, vg).out, (qg, kg, vg), dout)

    def sdpa_bwd(backend):
        from torch.nn.attention import sdpa_kernel

        def run():
            with sdpa_kernel(backend):
                out = torch.nn.functional.scaled_dot_product_attention(
                    *(t.transpose(1, 2) for t in (qg, kg, vg)))
            return torch.autograd.grad(out, (qg, kg, vg), dout.transpose(1, 2))
        return run

    def eager_bwd():
        out, _, mass = flow_attention_reference(
            qg, kg, vg, groups[None], groups[None], *rules.tables_on(device), None, None, 3,
            True, chunk_size=n)
        return torch.autograd.grad([out, mass], (qg, kg, vg), [dout, dmass])

    from torch.nn.attention import SDPBackend

    backward_providers = {
        "ditflow (no rules)": ditflow_plain_bwd,
        "ditflow (rules + mass)": ditflow_rules_bwd,
        "sdpa flash": sdpa_bwd(SDPBackend.FLASH_ATTENTION),
        "sdpa cudnn": sdpa_bwd(SDPBackend.CUDNN_ATTENTION),
        "eager reference (rules + mass)": eager_bwd,
    }
    for name, fn in backward_providers.items():
        row = dict(shape=shape, n=n, dtype=str(dtype).removeprefix("torch."), provider=name,
                   direction="forward+backward")
        rows.append(_timed(row, fn, 3.5 * flops_fwd))


def sweep_configs(shape: str, dtype: torch.dtype, specs: list[str], rows: list[dict]):
    """Time flow attention (rules + mass, forward and forward+backward) under pinned configs."""
    n, groups, q, k, v, flops_fwd = _problem(shape, dtype, requires_grad=True)
    rules = uvr_like_rules()
    dout = torch.randn_like(q)
    dmass = torch.randn(1, q.shape[2], n, 3, device="cuda")
    for spec in specs:
        os.environ["DITFLOW_TRITON_CONFIG"] = spec
        row = dict(shape=shape, n=n, dtype=str(dtype).removeprefix("torch."), config=spec)
        try:
            with torch.no_grad():
                row["fwd_ms"] = _bench(lambda: flow_attention(
                    q, k, v, groups, rules=rules, return_mass=True))[0]

            def fwd_bwd():
                res = flow_attention(q, k, v, groups, rules=rules, return_mass=True)
                return torch.autograd.grad([res.out, res.mass], (q, k, v), [dout, dmass])

            row["fwd_bwd_ms"] = _bench(fwd_bwd)[0]
            row["fwd_tflops"] = flops_fwd / row["fwd_ms"] / 1e9
            row["bwd_tflops"] = 2.5 * flops_fwd / (row["fwd_bwd_ms"] - row["fwd_ms"]) / 1e9
        except Exception as exc:
            row["note"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        rows.append(row)
        print(row, flush=True)
    os.environ.pop("DITFLOW_TRITON_CONFIG", None)


def _table(rows: list[dict]) -> str:
    lines = [f"{'shape':<13} {'dtype':<9} {'direction':<17} {'provider':<32} {'ms':>8} "
             f"{'TFLOP/s':>8} {'peak MiB':>9} {'max err':>9}"]
    for r in rows:
        lines.append(
            f"{r['shape']:<13} {r['dtype']:<9} {r['direction']:<17} {r['provider']:<32} "
            f"{r['ms']:>8.3f} {r['tflops']:>8.1f} {r['peak_mib']:>9.0f} "
            f"{r.get('max_err', math.nan):>9.2e} {r.get('note', '')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", nargs="+", default=["kontext-1024"], choices=list(SHAPES))
    parser.add_argument("--dtype", nargs="+", default=["bf16"], choices=list(DTYPES))
    parser.add_argument("--no-backward", action="store_true")
    parser.add_argument("--sweep", nargs="*", default=None,
                        help="DITFLOW_TRITON_CONFIG specs to time instead of the providers")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.attention needs a CUDA GPU")
    rows: list[dict] = []
    for shape in args.shape:
        for dtype in args.dtype:
            if args.sweep is not None:
                sweep_configs(shape, DTYPES[dtype], args.sweep, rows)
            else:
                run_shape(shape, DTYPES[dtype], not args.no_backward, rows)
    save(args.out, "sweep" if args.sweep is not None else "attention", "attention", argv,
         rows=rows)
    if args.sweep is None:
        print(_table(rows))


if __name__ == "__main__":
    main()
