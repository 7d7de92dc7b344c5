"""ditflow: attention interventions for multimodal diffusion transformers."""

from .functional import FlowAttentionOutput, flow_attention
from .rules import FlowRules

__version__ = "0.1.0"

__all__ = ["FlowAttentionOutput", "FlowRules", "__version__", "flow_attention"]
