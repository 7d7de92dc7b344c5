"""Triton kernels and launchers of ditflow (installed as ``ditflow.kernels``).

Imports only torch and triton. Autograd, validation and dispatch live in ``ditflow.ops``.
"""

from .flow_attention import (
    FlowConfigs,
    FlowInputs,
    KernelConfig,
    flow_attention_backward,
    flow_attention_forward,
    plan_for,
    select_configs,
)
from .tile_plan import BLOCKED, MIXED, UNIFORM, TilePlan, build_tile_plan

__all__ = [
    "BLOCKED",
    "MIXED",
    "UNIFORM",
    "FlowConfigs",
    "FlowInputs",
    "KernelConfig",
    "TilePlan",
    "build_tile_plan",
    "flow_attention_backward",
    "flow_attention_forward",
    "plan_for",
    "select_configs",
]
