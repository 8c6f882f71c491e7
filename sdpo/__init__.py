"""SDPO: Self-Distillation Policy Optimization on TRL's GRPO machinery, with the fused `sdpo_kernels` loss.

from sdpo import SDPOConfig, SDPOTrainer
"""

from .config import SDPOConfig
from .trainer import SDPOTrainer

__all__ = ["SDPOConfig", "SDPOTrainer"]
