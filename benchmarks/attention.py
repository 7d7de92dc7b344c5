"""Attention sweep: flow attention against the eager reference, SDPA, FlexAttention, flash-attn.

Every provider runs in this one process on the same random inputs; each is checked against an
fp32 reference (outputs in the forward, dq/dk/dv in the backward) before it is timed. Usage::

    python -m benchmarks.attention --shape kontext-1024 --dtype bf16 --out benchmarks/results

Prints a table last and writes ``attention-<device>-<date>.json`` (with device, versions, git
commit and the command) under ``--out``, rewritten after every shape and dtype (and every config
of a ``--sweep``), so a run cut short keeps what it finished. OOM, or a provider that is not
installed, cannot be set up or cannot run on this device, is recorded as NaN with a note, not a
crash. Made for a GPU; ``--shape tiny`` runs the whole script on a CPU in seconds (what the test
suite does, so the script cannot rot between GPU runs).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.results import ResultsFile, failure_note
from benchmarks.timing import bench
from ditflow import FlowRules, flow_attention
from ditflow.reference import flow_attention_reference

TEXT, TARGET, CONTEXT = 0, 1, 2
GROUPS = 3


@dataclass(frozen=True)
class Shape:
    text: int
    target: int
    context: int
    heads: int = 24  # 24 heads x 128 for FLUX-family models and Qwen-Image
    head_dim: int = 128

    @property
    def n(self) -> int:
        return self.text + self.target + self.context


SHAPES = {
    "flux-1024": Shape(512, 4096, 0),
    "kontext-512": Shape(512, 1024, 1024),
    "step1x-512": Shape(640, 1024, 1024),
    "kontext-1024": Shape(512, 4096, 4096),
    # Qwen-Image-Edit at 1 MP: its text is Qwen2.5-VL's output for the photo (at most 37 x 37
    # merged 28-px patches, 1369 tokens, depending on the processor's max_pixels) plus the
    # instruction and the template's tail: about 1390
    "qwen-edit-1024": Shape(1390, 4096, 4096),
    "tiny": Shape(8, 40, 40, heads=2, head_dim=32),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def uvr_like_rules() -> FlowRules:
    """Rules of the kind the methods use: context damped after the softmax, text scaled."""
    return (FlowRules(num_groups=GROUPS)
            .weight_probs([TEXT, TARGET], CONTEXT, 0.4)
            .scale_logits(TARGET, [TEXT, TARGET], 1.05))


def scale_rules() -> FlowRules:
    """The part of ``uvr_like_rules`` that a score_mod can express (no post-softmax weight)."""
    return FlowRules(num_groups=GROUPS).scale_logits(TARGET, [TEXT, TARGET], 1.05)


@dataclass
class Problem:
    """Random inputs of one shape and dtype, leaves that require grad, and random cotangents."""

    shape: Shape
    groups: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor
    dlse: torch.Tensor
    dmass: torch.Tensor

    @classmethod
    def random(cls, shape: Shape, dtype: torch.dtype, device: torch.device) -> Problem:
        sizes = (shape.text, shape.target, shape.context)
        groups = torch.cat([torch.full((s,), g, device=device, dtype=torch.int32)
                            for g, s in enumerate(sizes)])
        q, k, v = (torch.randn(1, shape.n, shape.heads, shape.head_dim, device=device,
                               dtype=dtype, requires_grad=True) for _ in range(3))
        return cls(shape, groups, q, k, v, torch.randn_like(q),
                   torch.randn(1, shape.heads, shape.n, device=device),
                   torch.randn(1, shape.heads, shape.n, GROUPS, device=device))

    @property
    def flops(self) -> float:
        """Forward FLOPs, 4·B·H·Nq·Nk·D (the rules here block no pair: nothing is skipped)."""
        s = self.shape
        return 4 * s.heads * s.n * s.n * s.head_dim

    @property
    def leaves(self) -> tuple[torch.Tensor, ...]:
        """q, k, v requiring grad, for the backward providers."""
        return self.q, self.k, self.v

    @property
    def qkv(self) -> tuple[torch.Tensor, ...]:
        """q, k, v detached, for the forward providers (FlexAttention on a CPU refuses inputs
        that require grad even under no_grad)."""
        return self.q.detach(), self.k.detach(), self.v.detach()


def _transposed(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """[B, N, H, D] <-> [B, H, N, D], the layout of SDPA and FlexAttention."""
    return tuple(t.transpose(1, 2) for t in tensors)


def _reference(qkv: tuple[torch.Tensor, ...], groups: torch.Tensor, rules: FlowRules | None, *,
               mass: bool = False, chunk_size: int | None = None):
    """The specification, ``(out, lse, mass)``; ``chunk_size=N`` materialises every score at
    once, as the methods' public code does (the "eager reference" provider)."""
    if rules is None:
        return flow_attention_reference(*qkv, chunk_size=chunk_size)
    return flow_attention_reference(
        *qkv, groups[None], groups[None], *rules.tables_on(groups.device), None, None, GROUPS,
        mass, chunk_size=chunk_size)


def _fp32_truths(p: Problem, names=("plain", "rules", "scale")) -> dict[str, object]:
    """fp32 reference outputs and gradients that each provider is checked against: for no rules,
    the rules with the mass, and the scale rules with the LSE (one reference pass each)."""
    qkv = tuple(t.detach().float().requires_grad_() for t in p.leaves)
    dout = p.dout.float()
    truths = {}
    cases = (("plain", None, None), ("rules", uvr_like_rules(), "mass"),
             ("scale", scale_rules(), "lse"))
    for name, rules, statistic in (case for case in cases if case[0] in names):
        out, lse, mass = _reference(qkv, p.groups, rules, mass=statistic == "mass")
        outputs, cotangents = [out], [dout]
        if statistic == "mass":
            outputs, cotangents = [out, mass], [dout, p.dmass]
        elif statistic == "lse":
            outputs, cotangents = [out, lse], [dout, p.dlse]
        truths[name] = out.detach()
        truths[f"{name} grads"] = torch.autograd.grad(outputs, qkv, cotangents)
    return truths


# -- providers: name -> (forward or forward+backward callable, the truth it is checked against)

Providers = dict[str, tuple[Callable[[], object], str | None]]


class ProviderUnavailable(Exception):
    """Raised by the rows of a provider that is not installed or could not be set up; its
    message is the rows' note."""


def _unavailable(exc: Exception, forward: list[str], backward: list[str]
                 ) -> tuple[Providers, Providers]:
    """Rows recording why a provider could not be set up ("not installed", or what failed) as
    NaN: the provider stays in the results instead of disappearing."""
    note = "not installed" if isinstance(exc, ModuleNotFoundError) else failure_note(exc)

    def fail():
        raise ProviderUnavailable(note)

    return ({name: (fail, None) for name in forward}, {name: (fail, None) for name in backward})


def _ditflow(p: Problem) -> tuple[Providers, Providers]:
    rules, mass_only = uvr_like_rules(), FlowRules(num_groups=GROUPS)

    def rules_bwd():
        res = flow_attention(*p.leaves, p.groups, rules=rules, return_mass=True)
        return torch.autograd.grad([res.out, res.mass], p.leaves, [p.dout, p.dmass])

    def plain_bwd():
        return torch.autograd.grad(flow_attention(*p.leaves).out, p.leaves, p.dout)

    forward = {
        "ditflow (no rules)": (lambda: flow_attention(*p.qkv), "plain"),
        "ditflow (rules + mass)": (lambda: flow_attention(
            *p.qkv, p.groups, rules=rules, return_mass=True, return_lse=True), "rules"),
        "ditflow (mass only)": (lambda: flow_attention(
            *p.qkv, p.groups, rules=mass_only, return_mass=True), "plain"),
    }
    backward = {"ditflow (no rules)": (plain_bwd, "plain grads"),
                "ditflow (rules + mass)": (rules_bwd, "rules grads")}
    return forward, backward


def _eager(p: Problem) -> tuple[Providers, Providers]:
    rules = uvr_like_rules()

    def fwd(leaves=p.qkv):
        return _reference(leaves, p.groups, rules, mass=True, chunk_size=p.shape.n)

    def bwd():
        out, _, mass = fwd(p.leaves)
        return torch.autograd.grad([out, mass], p.leaves, [p.dout, p.dmass])

    name = "eager reference (rules + mass)"
    return {name: (fwd, "rules")}, {name: (bwd, "rules grads")}


def _sdpa(p: Problem) -> tuple[Providers, Providers]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    forward, backward = {}, {}
    for name, backend in (("sdpa flash", SDPBackend.FLASH_ATTENTION),
                          ("sdpa cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("sdpa efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def fwd(backend=backend, leaves=p.qkv):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(*_transposed(*leaves))

        def bwd(fwd=fwd):
            return torch.autograd.grad(fwd(leaves=p.leaves), p.leaves, _transposed(p.dout))

        forward[name], backward[name] = (fwd, "plain"), (bwd, "plain grads")
    return forward, backward


def _flex(p: Problem) -> tuple[Providers, Providers]:
    """FlexAttention with the scale rules as a score_mod reading each token's group from a
    lookup table, returning the LSE, whose gradient flows in the backward (the post-softmax
    weight and the mass have no FlexAttention equivalent)."""
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except Exception as exc:  # a torch without FlexAttention
        return _unavailable(exc, ["flex (plain)", "flex (scale rules + lse)"],
                            ["flex (scale rules, grad through lse)"])
    flex = torch.compile(flex_attention, dynamic=False)
    table, groups = scale_rules().tables_on(p.q.device)[0][0], p.groups

    def score_mod(score, b, h, q_idx, kv_idx):
        return score * table[groups[q_idx], groups[kv_idx]]

    def ruled(leaves=p.qkv):
        return flex(*_transposed(*leaves), score_mod=score_mod, return_lse=True)

    def ruled_bwd():
        out, lse = ruled(p.leaves)
        return torch.autograd.grad([out, lse], p.leaves, [*_transposed(p.dout), p.dlse])

    forward = {"flex (plain)": (lambda: flex(*_transposed(*p.qkv)), "plain"),
               "flex (scale rules + lse)": (ruled, "scale")}
    return forward, {"flex (scale rules, grad through lse)": (ruled_bwd, "scale grads")}


def _flash_attn(p: Problem) -> tuple[Providers, Providers]:
    """flash-attn 2/3 (``flash_attn``), plain attention only."""
    try:
        from flash_attn import flash_attn_func
    except Exception as exc:  # not installed, or built against another torch
        return _unavailable(exc, ["flash-attn"], ["flash-attn"])

    def bwd():
        return torch.autograd.grad(flash_attn_func(*p.leaves), p.leaves, p.dout)

    return ({"flash-attn": (lambda: flash_attn_func(*p.qkv), "plain")},
            {"flash-attn": (bwd, "plain grads")})


def _fa4_score_mods(num_groups: int):
    """CuTe-DSL score_mod / score_mod_bwd multiplying a score by table[group(q), group(k)].

    aux_tensors: (group of each token, int32 [N]; the table, fp32 [G * G]). Written after the
    score_mod examples in FlashAttention-4's tests (one element per call when aux tensors are
    used)."""
    import cutlass
    import cutlass.cute as cute

    @cute.jit
    def factor(q_idx, kv_idx, aux_tensors):
        groups, table = aux_tensors[0], aux_tensors[1]
        q_frag = cute.make_rmem_tensor(1, cutlass.Int32)
        q_frag.store(q_idx)
        kv_frag = cute.make_rmem_tensor(1, cutlass.Int32)
        kv_frag.store(kv_idx)
        value = cute.make_rmem_tensor(1, cutlass.Float32)
        value[0] = table[groups[q_frag[0]] * num_groups + groups[kv_frag[0]]]
        return value.load()

    @cute.jit
    def score_mod(scores, b_idx, h_idx, q_idx, kv_idx, seqlen_info, aux_tensors):
        return scores * factor(q_idx, kv_idx, aux_tensors)

    @cute.jit
    def score_mod_bwd(grad, score, b_idx, h_idx, q_idx, kv_idx, seqlen_info, aux_tensors):
        return grad * factor(q_idx, kv_idx, aux_tensors)

    return score_mod, score_mod_bwd


def _fa4(p: Problem) -> tuple[Providers, Providers]:
    """FlashAttention-4 (``flash-attn-4``, CuTe DSL; Hopper and Blackwell): plain, and with the
    scale rules as a score_mod, LSE returned and differentiated."""
    forward_names = ["fa4 (plain)", "fa4 (scale rules + lse)"]
    backward_names = ["fa4 (plain)", "fa4 (scale rules, grad through lse)"]
    try:
        from flash_attn.cute import flash_attn_func

        score_mod, score_mod_bwd = _fa4_score_mods(GROUPS)
    except Exception as exc:  # not installed, or flash_attn.cute's API moved: note it, go on
        return _unavailable(exc, forward_names, backward_names)
    aux = [p.groups, scale_rules().tables_on(p.q.device)[0][0].flatten().contiguous()]

    def ruled(leaves=p.qkv):
        return flash_attn_func(*leaves, score_mod=score_mod, score_mod_bwd=score_mod_bwd,
                               aux_tensors=aux, return_lse=True)

    def plain_bwd():
        return torch.autograd.grad(_first(flash_attn_func(*p.leaves)), p.leaves, p.dout)

    def ruled_bwd():
        out, lse = ruled(p.leaves)
        return torch.autograd.grad([out, lse], p.leaves, [p.dout, p.dlse])

    forward = dict(zip(forward_names, [(lambda: flash_attn_func(*p.qkv), "plain"),
                                       (ruled, "scale")], strict=True))
    backward = dict(zip(backward_names, [(plain_bwd, "plain grads"),
                                         (ruled_bwd, "scale grads")], strict=True))
    return forward, backward


# -- measuring ---------------------------------------------------------------------------------

def _first(result):
    return result[0] if isinstance(result, tuple | list) else result


def _max_error(result, truth) -> float:
    """Largest absolute difference from the truth: the output, or the worst of dq, dk, dv."""
    if isinstance(truth, tuple):
        return max(_max_error(r, t) for r, t in zip(result, truth, strict=True))
    result = _first(result)
    result = getattr(result, "out", result)
    if result.shape != truth.shape:  # [B, H, N, D] providers
        result = result.transpose(1, 2)
    return (result.float() - truth).abs().max().item()


def _timed(row: dict, fn: Callable[[], object], flops: float, device: torch.device,
           truth=None) -> dict:
    """Fill max error (against ``truth``), ms, TFLOP/s and peak MiB into ``row``; a failure is
    recorded as NaN with a note."""
    try:
        if truth is not None:
            row["max_err"] = _max_error(fn(), truth)
        row["ms"], row["peak_mib"] = bench(fn, device)
        row["tflops"] = flops / row["ms"] / 1e9
    except Exception as exc:  # OOM or a provider that cannot run here: recorded, not fatal
        note = str(exc) if isinstance(exc, ProviderUnavailable) else failure_note(exc)
        row.update(ms=math.nan, peak_mib=math.nan, tflops=math.nan, note=note)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def run_shape(shape: str, dtype: torch.dtype, backward: bool, device: torch.device,
              rows: list[dict], results: ResultsFile) -> None:
    """Time every provider at ``shape``; ``results`` is rewritten after each row."""
    torch._dynamo.reset()  # FlexAttention recompiles per shape; stay under the recompile limit
    p = Problem.random(SHAPES[shape], dtype, device)
    truths = _fp32_truths(p)
    forward: Providers = {}
    backward_providers: Providers = {}
    for providers in (_ditflow, _eager, _sdpa, _flex, _flash_attn, _fa4):
        fwd, bwd = providers(p)
        forward.update(fwd)
        backward_providers.update(bwd)

    base = dict(shape=shape, n=p.shape.n, dtype=str(dtype).removeprefix("torch."))
    for name, (fn, truth) in forward.items():
        with torch.no_grad():
            rows.append(_timed(dict(base, provider=name, direction="forward"), fn, p.flops,
                               device, truths.get(truth)))
            results.write(rows=rows)
    if backward:
        for name, (fn, truth) in backward_providers.items():
            rows.append(_timed(dict(base, provider=name, direction="forward+backward"), fn,
                               3.5 * p.flops, device, truths.get(truth)))
            results.write(rows=rows)


def sweep_configs(shape: str, dtype: torch.dtype, specs: list[str], device: torch.device,
                  rows: list[dict], results: ResultsFile) -> None:
    """Time flow attention (rules + mass, forward and forward+backward) under pinned configs,
    each checked against the fp32 reference first: a config that computes wrong results is
    recorded with its error, not picked for its speed. ``results`` is rewritten after each."""
    p = Problem.random(SHAPES[shape], dtype, device)
    truths = _fp32_truths(p, names=("rules",))
    rules = uvr_like_rules()
    for spec in specs:
        if spec == "default":
            os.environ.pop("DITFLOW_TRITON_CONFIG", None)
        else:
            os.environ["DITFLOW_TRITON_CONFIG"] = spec
        row = dict(shape=shape, n=p.shape.n, dtype=str(dtype).removeprefix("torch."),
                   config=spec)
        try:
            def fwd():
                return flow_attention(*p.leaves, p.groups, rules=rules, return_mass=True)

            def fwd_bwd():
                res = fwd()
                return torch.autograd.grad([res.out, res.mass], p.leaves, [p.dout, p.dmass])

            with torch.no_grad():
                row["fwd_max_err"] = _max_error(fwd(), truths["rules"])
                row["fwd_ms"] = bench(fwd, device)[0]
            row["bwd_max_err"] = _max_error(fwd_bwd(), truths["rules grads"])
            row["fwd_bwd_ms"] = bench(fwd_bwd, device)[0]
            row["fwd_tflops"] = p.flops / row["fwd_ms"] / 1e9
            row["bwd_tflops"] = 2.5 * p.flops / (row["fwd_bwd_ms"] - row["fwd_ms"]) / 1e9
        except Exception as exc:
            row["note"] = failure_note(exc)
        rows.append(row)
        print(row, flush=True)
        results.write(rows=rows)
    os.environ.pop("DITFLOW_TRITON_CONFIG", None)


def _table(rows: list[dict]) -> str:
    lines = [f"{'shape':<13} {'dtype':<9} {'direction':<17} {'provider':<36} {'ms':>8} "
             f"{'TFLOP/s':>8} {'peak MiB':>9} {'max err':>9}"]
    for r in rows:
        lines.append(
            f"{r['shape']:<13} {r['dtype']:<9} {r['direction']:<17} {r['provider']:<36} "
            f"{r['ms']:>8.3f} {r['tflops']:>8.1f} {r['peak_mib']:>9.0f} "
            f"{r.get('max_err', math.nan):>9.2e} {r.get('note', '')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Path:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", nargs="+", default=["kontext-1024"], choices=list(SHAPES))
    parser.add_argument("--dtype", nargs="+", default=["bf16"], choices=list(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-backward", action="store_true")
    parser.add_argument("--sweep", nargs="*", default=None,
                        help="DITFLOW_TRITON_CONFIG specs to time instead of the providers "
                             "('default': the built-in table)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    results = ResultsFile(args.out, "sweep" if args.sweep is not None else "attention",
                          "attention", argv)
    rows: list[dict] = []
    for shape in args.shape:
        for dtype in args.dtype:
            if args.sweep is not None:
                sweep_configs(shape, DTYPES[dtype], args.sweep, device, rows, results)
            else:
                run_shape(shape, DTYPES[dtype], not args.no_backward, device, rows, results)
    if args.sweep is None:
        print(_table(rows))
    return results.path


if __name__ == "__main__":
    main()
