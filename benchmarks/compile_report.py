"""Registers, spills, shared memory and per-score arithmetic of the flow-attention kernels,
compiled for a GPU on any machine: Triton compiles for a named architecture without one, with
the ``ptxas`` its wheel ships. Usage::

    python -m benchmarks.compile_report                      # the default GPU configs, sm_90
    python -m benchmarks.compile_report --config 32x128:8:3 64x64:4:5 --kernel dkdv

Every kernel variant the launchers would start for a FLUX-like layout (no rules; rules + mass;
bias with a pair mask) is captured from the real launcher code, so the argument types, the
constexpr flags and the 16-divisibility of sizes, strides and pointers are the ones a GPU run
compiles. A kernel that spills (local-memory loads and stores in the SASS) or needs more shared
memory than the architecture has shows up here before any GPU time is spent. Triton's version
decides the code: the report names it.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.tools.tensor_descriptor import TensorDescriptor

from benchmarks.results import save
from kernels import launch as launchers
from kernels.configs import FlowConfigs, pin_configs, select_configs
from kernels.launch import FlowInputs

KERNELS = {"forward": "_fwd_kernel", "dkdv": "_bwd_dkdv_kernel", "dq": "_bwd_dq_kernel"}
LAUNCH_OPTIONS = ("num_warps", "num_stages")
# Shared memory one program may use (the opt-in maximum per block), by compute capability.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024}
TORCH_TO_TRITON = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
                   torch.int32: "i32", torch.int64: "i64", torch.bool: "i1"}
# Kontext 512²: text, target and context, boundaries on 128-token tiles; the ragged tail
# (2563 keys) makes the last column of tiles mixed, as in most real layouts.
LAYOUT = (512, 1024, 1027)
TEXT, TARGET, CONTEXT = 0, 1, 2


def _bin_dir() -> Path:
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def available() -> bool:
    """Whether this Triton can compile for NVIDIA GPUs here (its wheel ships ptxas)."""
    return (_bin_dir() / "ptxas").exists() and (_bin_dir() / "cuobjdump").exists()


@dataclass
class Launch:
    kernel: triton.JITFunction
    args: tuple
    kwargs: dict


class _Recorder:
    """Stands in for a JIT kernel: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, kernel: triton.JITFunction, launches: list[Launch]):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(Launch(self.kernel, args, kwargs))


@contextmanager
def recorded_launches(names: Sequence[str] = (*KERNELS.values(), "_bwd_preprocess_kernel")
                      ) -> Iterator[list[Launch]]:
    """Within the block, the launchers record their launches of the kernels called ``names``
    (default: flow attention's) instead of running them (the kernels are swapped where the
    launchers look them up: in ``kernels.launch``)."""
    originals = {name: getattr(launchers, name) for name in names}
    launches: list[Launch] = []
    try:
        for name in names:
            setattr(launchers, name, _Recorder(originals[name], launches))
        yield launches
    finally:
        for name, kernel in originals.items():
            setattr(launchers, name, kernel)


def _variants() -> dict[str, tuple[FlowInputs, bool]]:
    """Kernel flags by variant: FlowInputs and whether the mass (and its gradient) is used."""
    n = sum(LAYOUT)
    groups = torch.repeat_interleave(torch.arange(3, dtype=torch.int32), torch.tensor(LAYOUT))
    groups = groups[None]
    ones = torch.ones(1, 3, 3)
    scale, weight = ones.clone(), ones.clone()
    scale[0, TARGET, :2] = 1.05
    weight[0, :2, CONTEXT] = 0.4
    bias = torch.zeros(1, 3, 3)
    bias[0, TEXT, CONTEXT] = float("-inf")
    bits = torch.zeros(1, n, -(-n // 32), dtype=torch.int32)
    return {
        "plain": (FlowInputs(), False),
        "rules+mass": (FlowInputs(3, groups, groups, scale=scale, weight=weight), True),
        "bias+pair-mask": (FlowInputs(3, groups, groups, bias=bias, pair_bits=bits), True),
    }


def capture(dtype: torch.dtype, configs: FlowConfigs, variant: str, head_dim: int = 128,
            heads: int = 24) -> dict[str, Launch]:
    """The forward, dk/dv and dq launches of one variant, by kernel."""
    inputs, with_mass = _variants()[variant]
    n = sum(LAYOUT)
    q, k, v = (torch.empty(1, n, heads, head_dim, dtype=dtype) for _ in range(3))
    lse = torch.empty(1, heads, n)
    mass = torch.empty(1, heads, n, inputs.num_groups) if with_mass else None
    plans = {name: launchers.plan_for(inputs, n, n, getattr(configs, name), q.device)
             for name in ("forward", "backward_dkdv", "backward_dq")}
    with recorded_launches() as launches:
        launchers.flow_attention_forward(q, k, v, inputs, head_dim**-0.5, with_mass,
                                         plans["forward"], configs.forward)
        launchers.flow_attention_backward(torch.empty_like(q), None, mass, q, k, v, q, lse, mass,
                                          inputs, head_dim**-0.5, plans["backward_dkdv"],
                                          plans["backward_dq"], configs)
    by_name = {launch.kernel.__name__: launch for launch in launches}
    return {kernel: by_name[name] for kernel, name in KERNELS.items()}


def _argument(value) -> tuple[str, bool]:
    """Triton type of a runtime argument and whether the JIT would mark it 16-divisible."""
    if isinstance(value, TensorDescriptor):
        block = ",".join(map(str, value.block_shape))
        return f"tensordesc<{TORCH_TO_TRITON[value.base.dtype]}[{block}]>", False
    if isinstance(value, torch.Tensor):
        return "*" + TORCH_TO_TRITON[value.dtype], value.data_ptr() % 16 == 0
    if isinstance(value, bool):
        return "i1", False
    if isinstance(value, int):
        return ("i32" if -2**31 <= value < 2**31 else "i64"), value % 16 == 0
    if isinstance(value, float):
        return "fp32", False
    raise TypeError(f"cannot type kernel argument {value!r}")


def compile_launch(launch: Launch, arch: int = 90):
    """Compile a recorded launch for ``sm_<arch>``, as the JIT would for the same arguments."""
    fn = launch.kernel
    options = {key: value for key, value in launch.kwargs.items() if key in LAUNCH_OPTIONS}
    constexprs = {key: value for key, value in launch.kwargs.items() if key not in LAUNCH_OPTIONS}
    signature, attrs = {}, {}
    runtime = [p.name for p in fn.params if not p.is_constexpr]
    for name, value in zip(runtime, launch.args, strict=True):
        signature[name], divisible = _argument(value)
        if divisible:
            attrs[(fn.arg_names.index(name),)] = [["tt.divisibility", 16]]
    signature.update({name: "constexpr" for name in constexprs})
    return triton.compile(ASTSource(fn, signature, constexprs, attrs),
                          target=GPUTarget("cuda", arch, 32), options=options)


def _compiled(names: Sequence[str], launch_them: Callable[[], object], arch: int) -> list:
    """(launch, compiled kernel) for each launch ``launch_them`` makes of the kernels called
    ``names``, compiled for ``sm_<arch>`` instead of run."""
    with recorded_launches(names) as launches:
        launch_them()
    return [(launch, compile_launch(launch, arch)) for launch in launches]


def _memory_accesses(ptx: str) -> list[str]:
    return sorted(set(re.findall(r"(?:ld|st)\.(?:global|local)[.\w]*", ptx)))


def rotary_memory_accesses(arch: int = 90) -> dict[str, list[str]]:
    """The global and local memory instructions of the rotary kernel's forward and backward
    (bf16, FLUX's 24 heads x 128 at Kontext 512²) compiled for ``sm_<arch>``, by pass."""
    x = torch.empty(1, 2560, 24, 128, dtype=torch.bfloat16)
    freqs = torch.empty(2560, 128)
    compiled = _compiled(["_rotary_kernel"], lambda: [
        launchers.rotary_embedding(x, freqs, freqs, transpose=t) for t in (False, True)], arch)
    return {("backward" if launch.kwargs["TRANSPOSE"] else "forward"):
            _memory_accesses(kernel.asm["ptx"]) for launch, kernel in compiled}


def head_mean_probs_report(arch: int = 90) -> dict[str, dict]:
    """Per kernel of the head-mean probabilities (bf16, 2048 region queries over FLUX's 4608
    tokens, 24 heads x 128) compiled for ``sm_<arch>``: local memory instructions and wgmma."""
    q = torch.empty(2048, 24, 128, dtype=torch.bfloat16)
    k = torch.empty(4608, 24, 128, dtype=torch.bfloat16)
    compiled = _compiled(["_head_lse_kernel", "_head_mean_probs_kernel"],
                         lambda: launchers.head_mean_probs(q, k, 128**-0.5), arch)
    return {launch.kernel.__name__: dict(
        local=[a for a in _memory_accesses(kernel.asm["ptx"]) if ".local" in a],
        wgmma=kernel.asm["ptx"].count("wgmma.mma_async")) for launch, kernel in compiled}


def uniform_loop(sass: str) -> list[str]:
    """The SASS instructions of the kernel's first loop, the uniform tiles' (the first backward
    branch closes it; the mixed tiles' loop follows)."""
    code = [(int(addr, 16), text) for addr, text in
            re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    for addr, text in code:
        target = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < addr:
            start = int(target.group(1), 16)
            return [t for a, t in code if start <= a <= addr]
    raise ValueError("no loop found in the SASS")


def resources(compiled) -> dict:
    """Registers, spill stack, local-memory instructions (in all and in the uniform-tile loop),
    the uniform-tile loop's length, shared memory, wgmma and TMA-load counts."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([_bin_dir() / "cuobjdump", "--dump-resource-usage", cubin],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_bin_dir() / "cuobjdump", "--dump-sass", cubin],
                              capture_output=True, text=True, check=True).stdout
    registers, stack = re.search(r"REG:(\d+) STACK:(\d+)", usage).groups()
    loop = uniform_loop(sass)
    return dict(
        registers=int(registers),
        spill_stack_bytes=int(stack),
        local_loads=len(re.findall(r"\bLDL\b", sass)),
        local_stores=len(re.findall(r"\bSTL\b", sass)),
        loop_instructions=len(loop),
        loop_local_accesses=sum(bool(re.search(r"\b(LDL|STL)\b", t)) for t in loop),
        shared_bytes=compiled.metadata.shared,
        wgmma=len(re.findall(r"\bHGMMA\b", sass)),
        tma_loads=len(re.findall(r"\bUTMALDG\b", sass)),
    )


def score_ops(compiled, rows: int, cols: int) -> int:
    """Operations per score element in the kernel's first tile loop (the uniform tiles): the
    elementwise ops producing, and the reductions over, an fp32 ``rows x cols`` tensor in the
    TTGIR. Each costs one instruction per element per thread-slice; the dots are not counted."""
    tile = f"tensor<{rows}x{cols}xf32"
    ir = compiled.asm["ttgir"].splitlines()
    start = next(i for i, line in enumerate(ir) if "scf.for" in line)
    depth, count = 0, 0
    for line in ir[start:]:
        depth += line.count("{") - line.count("}")
        elementwise = re.search(r"= (arith|math)\.\w+ .*: (tensor<[^>]*>, )*" + re.escape(tile),
                                line)
        reduction = re.search(r"\}\) : \(" + re.escape(tile), line)
        count += bool(elementwise) + bool(reduction)
        if depth <= 0 and line.lstrip().startswith("}"):
            return count
    raise ValueError("no tile loop found in the TTGIR")


def report(dtype: torch.dtype, configs: FlowConfigs, kernels: list[str], variants: list[str],
           arch: int = 90, head_dim: int = 128) -> list[dict]:
    rows = []
    for variant in variants:
        launches = capture(dtype, configs, variant, head_dim)
        for kernel in kernels:
            launch = launches[kernel]
            config = "{BLOCK_M}x{BLOCK_N}:{num_warps}:{num_stages}".format(**launch.kwargs)
            config += ":tma" if launch.kwargs["TMA"] else ""
            compiled = compile_launch(launch, arch)
            tile = (launch.kwargs["BLOCK_M"], launch.kwargs["BLOCK_N"])
            row = dict(kernel=kernel, variant=variant, dtype=str(dtype).removeprefix("torch."),
                       head_dim=head_dim, config=config, **resources(compiled),
                       score_ops=score_ops(compiled, *(tile[::-1] if kernel == "dkdv" else tile)))
            row["fits"] = row["shared_bytes"] <= SHARED_LIMIT[arch]
            rows.append(row)
            print(_line(row), flush=True)
    return rows


def _line(row: dict) -> str:
    spills = (f"spills {row['spill_stack_bytes']} B ({row['local_loads']} LDL / "
              f"{row['local_stores']} STL)" if row["spill_stack_bytes"] else "no spills")
    shared = f"shared {row['shared_bytes'] // 1024} KiB" + ("" if row["fits"] else " TOO LARGE")
    return (f"{row['kernel']:8} {row['variant']:15} {row['config']:17} regs {row['registers']:3}  "
            f"{spills:34} {shared}  wgmma {row['wgmma']:3}  TMA loads {row['tma_loads']:2}  "
            f"uniform loop {row['loop_instructions']:4} instr, {row['loop_local_accesses']:2} "
            f"LDL/STL  ops/score {row['score_ops']}")


def main(argv: list[str] | None = None) -> Path | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, choices=sorted(SHARED_LIMIT),
                        help="compute capability x10 (90: H100 and H200)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--kernel", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    parser.add_argument("--variant", nargs="+", default=["plain", "rules+mass"],
                        choices=["plain", "rules+mass", "bias+pair-mask"])
    parser.add_argument("--config", nargs="+", default=None, metavar="SPEC",
                        help="DITFLOW_TRITON_CONFIG specs to compile, each over the GPU table: "
                             "BMxBN:WARPS:STAGES[:tma] for every kernel, or per kernel as "
                             "backward_dkdv=64x64:4:3:tma,backward_dq=64x128:8:2:tma; "
                             "default: the GPU table")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.exit(1, "unset TRITON_INTERPRET: the report compiles the kernels for a GPU\n")
    if not available():
        parser.exit(1, f"this Triton has no NVIDIA compiler tools under {_bin_dir()}\n")
    dtype = dict(bf16=torch.bfloat16, fp16=torch.float16, fp32=torch.float32)[args.dtype]
    defaults = select_configs(args.head_dim, dtype, torch.device("cuda"), args.arch)
    try:
        configs = [defaults if spec == "default" else pin_configs(defaults, spec, "--config")
                   for spec in args.config or ["default"]]
    except ValueError as exc:
        parser.error(str(exc))
    rows = [row for cfg in configs
            for row in report(dtype, cfg, args.kernel, args.variant, args.arch, args.head_dim)]
    if args.out is None:
        return None
    kind = f"compile-sm{args.arch}" + ("-configs" if args.config else "")
    return save(args.out, kind, "compile_report", argv, rows=rows)


if __name__ == "__main__":
    main()
