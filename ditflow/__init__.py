"""ditflow: attention interventions for multimodal diffusion transformers."""

from .functional import FlowAttentionOutput, flow_attention
from .layout import CONTEXT, TARGET, TEXT, TokenLayout
from .rules import FlowRules
from .session import Intervention, StatsRecorder, attach

__version__ = "0.1.0"

__all__ = ["CONTEXT", "TARGET", "TEXT", "FlowAttentionOutput", "FlowRules", "Intervention",
           "StatsRecorder", "TokenLayout", "__version__", "attach", "flow_attention"]
