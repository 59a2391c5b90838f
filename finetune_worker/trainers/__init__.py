"""RL trainers, one class per algorithm with its config (TRL style)."""

from finetune_worker.trainers.dpo import DPOConfig, OnlineDPOTrainer
from finetune_worker.trainers.reinforce import ReinforceConfig, ReinforceTrainer

__all__ = ["DPOConfig", "OnlineDPOTrainer", "ReinforceConfig", "ReinforceTrainer"]
