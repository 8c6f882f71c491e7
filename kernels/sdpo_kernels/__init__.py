"""sdpo_kernels: fused SDPO self-distillation losses (Triton kernels + a PyTorch reference)."""

from .config import LossConfig
from .functional import self_distillation_loss
from .linear import LinearSelfDistillationLoss, linear_self_distillation_loss
from .modules import SelfDistillationLoss
from .policy import PolicyTerm

__all__ = [
    "LinearSelfDistillationLoss",
    "LossConfig",
    "PolicyTerm",
    "SelfDistillationLoss",
    "linear_self_distillation_loss",
    "self_distillation_loss",
]
__version__ = "0.1.0"
