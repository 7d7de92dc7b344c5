"""CPU: the C++ kernels against the reference, time and peak memory.

    python -m benchmarks.cpu_kernel --n 1024 2048 4096 --out benchmarks/results
    python -m benchmarks.cpu_kernel --testbed --out benchmarks/results

Every (provider, N) runs in a fresh process (peak RSS is per process): forward with rules and
mass, then the backward with mass gradients, on random inputs (B=1, H=4, D=64, a Kontext-like
3-group layout). Reports the median of ``--repeats`` timed runs after one warm-up, and the
process's peak resident memory above what it held before the first call. ``--testbed`` times the
shape of DeContext on the testbed editor instead (B=8, N=536 = 24 text + 256 target + 256
context tokens, 4 heads x 16, mass only), with SDPA without statistics as the floor
(``cpu-kernel-testbed-...json``).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.results import save


def _measure(backend: str, n: int, repeats: int, testbed: bool = False) -> dict:
    from ditflow import FlowRules, flow_attention

    torch.manual_seed(0)
    if testbed:
        batch, heads, head_dim, sizes = 8, 4, 16, (24, 256, 256)
        rules = FlowRules(num_groups=3)
    else:
        batch, heads, head_dim, sizes = 1, 4, 64, (n // 8, (n - n // 8) // 2,
                                                   n - n // 8 - (n - n // 8) // 2)
        rules = FlowRules(num_groups=3).weight_probs([0, 1], 2, 0.4).scale_logits(1, 0, 1.2)
    n = sum(sizes)
    groups = torch.cat([torch.full((size,), g) for g, size in enumerate(sizes)])
    q, k, v = (torch.randn(batch, n, heads, head_dim, requires_grad=True) for _ in range(3))
    dout, dmass = torch.randn(batch, n, heads, head_dim), torch.randn(batch, heads, n, 3)

    def step(q, k, v, groups, dout, dmass):
        if backend == "sdpa":  # plain attention, no statistics: the floor
            out = torch.nn.functional.scaled_dot_product_attention(
                *(t.transpose(1, 2) for t in (q, k, v)))
            torch.autograd.grad(out, (q, k, v), dout.transpose(1, 2))
            return
        res = flow_attention(q, k, v, groups, rules=rules, return_mass=True, backend=backend)
        torch.autograd.grad([res.out, res.mass], (q, k, v), [dout, dmass])

    # Libraries allocate their pools on first use: warm them on a small problem before the
    # baseline, so the peak counts this problem's memory.
    small = [t[:, :64].detach().requires_grad_() for t in (q, k, v)]
    step(*small, groups[:64], dout[:, :64], dmass[:, :, :64])
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        step(q, k, v, groups, dout, dmass)
        if i:
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return dict(backend=backend, n=n, batch=batch, heads=heads, head_dim=head_dim,
                seconds=statistics.median(times), peak_mib=(peak - base) / 1024,
                threads=torch.get_num_threads())


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--testbed", action="store_true",
                        help="the testbed DeContext shape instead of --n (adds SDPA)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--child", nargs=2, metavar=("BACKEND", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_measure(args.child[0], int(args.child[1]), args.repeats,
                                  args.testbed)))
        return
    cases = ([(b, 536) for b in ("cpp", "reference", "sdpa")] if args.testbed
             else [(b, n) for n in args.n for b in ("cpp", "reference")])
    rows = []
    for backend, n in cases:
        result = subprocess.run(
            [sys.executable, "-m", "benchmarks.cpu_kernel", "--child", backend, str(n),
             "--repeats", str(args.repeats)] + (["--testbed"] if args.testbed else []),
            capture_output=True, text=True, check=True)
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    save(args.out, "cpu-kernel-testbed" if args.testbed else "cpu-kernel", "cpu_kernel", argv,
         rows=rows)


if __name__ == "__main__":
    main()
