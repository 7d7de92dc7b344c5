"""The ``ditflow`` command.

``ditflow demo`` runs offline on any machine. Until photo protection lands (DeContext on a tiny
offline editor) it demonstrates the engine underneath: the context-attention ratio ``r_ctx`` of a
Kontext-shaped joint sequence, how rules change it, and its gradient with respect to the context
tokens (the signal a protection attack follows).
"""

from __future__ import annotations

import argparse

import torch

from . import FlowRules, flow_attention
from .functional import resolve_backend

TEXT, TARGET, CONTEXT = 0, 1, 2


def _r_ctx(q, k, v, groups, rules, backend):
    """Mean over heads and target queries of the attention mass on context keys."""
    res = flow_attention(q, k, v, groups, rules=rules, return_mass=True, backend=backend)
    return res.mass[:, :, groups == TARGET, CONTEXT].mean()


def demo(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    backend = resolve_backend(args.backend, device)
    sizes = (args.text, args.image, args.image)
    groups = torch.cat([torch.full((n,), g, device=device) for g, n in enumerate(sizes)])
    n, heads, head_dim = groups.numel(), args.heads, 64
    q, k, v = (torch.randn(1, n, heads, head_dim, device=device) for _ in range(3))
    # Context keys resemble the target's: an editor copies from its context.
    k[:, groups == CONTEXT] = k[:, groups == TARGET] + 0.5 * torch.randn_like(
        k[:, groups == TARGET])
    print(f"Kontext-shaped sequence: text {args.text} | target {args.image} | context "
          f"{args.image} tokens, {heads} heads x {head_dim}, backend={backend}, device={device}")

    plain = FlowRules(num_groups=3)
    cases = [
        ("no intervention", plain),
        ("context probabilities x0.2 (UVR-style)", plain.weight_probs([TEXT, TARGET], CONTEXT,
                                                                      0.2)),
        ("context logits x0.5", plain.scale_logits(TARGET, CONTEXT, 0.5)),
        ("target -> context blocked", plain.block(TARGET, CONTEXT)),
    ]
    print(f"\n{'rules':<42} {'r_ctx':>8}")
    for name, rules in cases:
        with torch.no_grad():
            r = _r_ctx(q, k, v, groups, rules, backend).item()
        print(f"{name:<42} {r:>8.4f}")

    context_k = k[:, groups == CONTEXT].clone().requires_grad_()
    k_full = torch.cat([k[:, groups != CONTEXT], context_k], dim=1)
    r = _r_ctx(q, k_full, v, groups, plain, backend)
    (grad,) = torch.autograd.grad(r, context_k)
    step = k_full.detach().clone()
    step[:, groups == CONTEXT] -= args.step * grad.sign()
    with torch.no_grad():
        after = _r_ctx(q, step, v, groups, plain, backend).item()
    print(f"\nr_ctx {r.item():.4f} -> {after:.4f} after one signed-gradient step of "
          f"{args.step} on the context keys (the direction DeContext follows)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ditflow", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="offline demonstration of flow attention (see module doc)")
    p.add_argument("--text", type=int, default=64, help="text tokens")
    p.add_argument("--image", type=int, default=256, help="target (= context) image tokens")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--step", type=float, default=0.05, help="signed-gradient step on context keys")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default=None, help="triton | reference (default: per device)")
    p.set_defaults(run=demo)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
