"""Block shapes of the flow-attention kernels: a :class:`KernelConfig` per kernel, the table
:func:`select_configs` picks them from, and its ``DITFLOW_TRITON_CONFIG`` override."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class KernelConfig:
    """Block shape of one kernel: ``block_m`` queries by ``block_n`` keys, powers of two of at
    least 16 and 32 (the pair mask is unpacked 32 keys at a time). ``tma``: the operands read
    per tile come through TMA descriptors where the GPU has TMA (Hopper on) and the tensors'
    alignment allows; elsewhere the same config loads through pointers."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    tma: bool = False

    def __post_init__(self):
        for name, least in (("block_m", 16), ("block_n", 32)):
            size = getattr(self, name)
            if size < least or size & (size - 1):
                raise ValueError(f"{name} must be a power of two >= {least}, got {size}")


@dataclass(frozen=True)
class FlowConfigs:
    """Block shapes of the three kernels: the forward, the backward's dk/dv and its dq."""

    forward: KernelConfig
    backward_dkdv: KernelConfig
    backward_dq: KernelConfig


def parse_config(spec: str) -> KernelConfig:
    """``BMxBN[:warps[:stages[:tma]]]``, e.g. ``128x64:8:3`` or ``128x128:8:2:tma``."""
    blocks, *rest = spec.split(":")
    try:
        if len(rest) > 3 or (len(rest) == 3 and rest[2] != "tma"):
            raise ValueError
        block_m, block_n = (int(x) for x in blocks.lower().split("x"))
        num_warps = int(rest[0]) if rest else 4
        num_stages = int(rest[1]) if len(rest) > 1 else 1
    except ValueError:
        raise ValueError(f"kernel config {spec!r}: expected BMxBN[:warps[:stages[:tma]]], "
                         "e.g. 128x64:8:3") from None
    return KernelConfig(block_m, block_n, num_warps, num_stages, tma=len(rest) == 3)


def _default_configs(head_dim: int, dtype: torch.dtype, device: torch.device,
                     arch: int | None) -> FlowConfigs:
    if device.type != "cuda":  # the interpreter: small tiles exercise multi-tile loops cheaply
        cfg = KernelConfig(32, 32, 4, 1)
        return FlowConfigs(cfg, cfg, cfg)
    if head_dim > 128 or dtype == torch.float32:
        return FlowConfigs(KernelConfig(64, 32, 4, 2), KernelConfig(32, 32, 4, 2),
                           KernelConfig(32, 32, 4, 2))
    if arch is None:
        major, minor = torch.cuda.get_device_capability(device)
        arch = 10 * major + minor
    if arch // 10 == 9:
        # Hopper: TMA, and shared memory for five forward stages (224 KiB). Measured on an H200
        # at the Kontext 1024² shape (bf16, D=128, rules + mass; sweep-NVIDIA-H200-2026-11-29*):
        # forward 2.44 -> 1.95 ms, forward + backward 9.69 -> 8.99 ms against the table below.
        return FlowConfigs(
            forward=KernelConfig(128, 128, 8, 5, tma=True),
            backward_dkdv=KernelConfig(64, 64, 4, 3, tma=True),
            backward_dq=KernelConfig(64, 64, 4, 3, tma=True),
        )
    # Measured on an H100 with pointer loads (sweep-NVIDIA-H100-80GB-HBM3-2026-11-22.json):
    # 128x128/8 warps/2 stages forward (160 KiB of shared memory), 64x64/4/3 backward.
    return FlowConfigs(
        forward=KernelConfig(128, 128, 8, 2),
        backward_dkdv=KernelConfig(64, 64, 4, 3),
        backward_dq=KernelConfig(64, 64, 4, 3),
    )


def select_configs(head_dim: int, dtype: torch.dtype, device: torch.device,
                   arch: int | None = None) -> FlowConfigs:
    """Block shapes for the three kernels on ``device``, for GPU architecture ``arch`` (``90``
    for sm_90; default: the device's own).

    Plans are built per block shape, so this is a small table rather than a Triton autotuner.
    ``DITFLOW_TRITON_CONFIG`` pins it (:func:`pin_configs`; unnamed kernels keep the table).
    """
    configs = _default_configs(head_dim, dtype, device, arch)
    pinned = os.environ.get("DITFLOW_TRITON_CONFIG")
    return pin_configs(configs, pinned, "DITFLOW_TRITON_CONFIG") if pinned else configs


def pin_configs(configs: FlowConfigs, spec: str, source: str = "config") -> FlowConfigs:
    """``configs`` with the kernels ``spec`` names replaced: ``BMxBN[:warps[:stages[:tma]]]``
    for every kernel, or ``forward=...,backward_dkdv=...,backward_dq=...`` per kernel. Errors
    name ``source``, where the spec came from."""
    try:
        if "=" not in spec:
            cfg = parse_config(spec)
            return FlowConfigs(cfg, cfg, cfg)
        chosen = {}
        for item in spec.split(","):
            name, _, kernel_spec = item.partition("=")
            if name not in FlowConfigs.__dataclass_fields__:
                raise ValueError(f"unknown kernel {name!r} (forward, backward_dkdv, backward_dq)")
            chosen[name] = parse_config(kernel_spec)
        return replace(configs, **chosen)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None
