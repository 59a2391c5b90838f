"""Reward models behind interfaces: text adherence, quality (MOS), user preference.

from musicrl.rewards import Clip, RewardSuite, load_reward_models
suite = RewardSuite(load_reward_models("checkpoints", impl="onnx"))
suite.score([Clip(prompt, wave=wave)])  # -> [{"text_adherence", "quality_mos", "quality", "preference", "combined"}]
"""

from musicrl.rewards.interfaces import AudioTextModel, PreferenceModel, QualityModel, TextAdherenceModel
from musicrl.rewards.loader import IMPLEMENTATIONS, RewardModels, load_component, load_reward_models
from musicrl.rewards.suite import COMPONENTS, DEFAULT_WEIGHTS, Clip, RewardSuite
from musicrl.rewards.windowing import edge_windows, segments

__all__ = [
    "AudioTextModel",
    "COMPONENTS",
    "DEFAULT_WEIGHTS",
    "IMPLEMENTATIONS",
    "Clip",
    "PreferenceModel",
    "QualityModel",
    "RewardModels",
    "RewardSuite",
    "TextAdherenceModel",
    "edge_windows",
    "load_component",
    "load_reward_models",
    "segments",
]
