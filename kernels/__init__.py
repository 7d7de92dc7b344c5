"""Triton kernels and launchers of ditflow (installed as ``ditflow.kernels``).

``flow_attention``, ``rotary`` and ``head_mean_probs`` hold the ``@triton.jit`` code,
``launch`` the launchers that marshal arguments into it, ``configs`` the block shapes,
``tile_plan`` the tile classification. Imports only torch and triton. Autograd, validation and
dispatch live in ``ditflow.ops``, ``ditflow.rotary`` and DeLeaker.
"""

from .configs import FlowConfigs, KernelConfig, select_configs
from .launch import (
    FlowInputs,
    flow_attention_backward,
    flow_attention_forward,
    head_mean_probs,
    plan_for,
    rotary_embedding,
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
    "head_mean_probs",
    "plan_for",
    "rotary_embedding",
    "select_configs",
]
