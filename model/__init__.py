"""LingBot-VA model package: the network, its losses, samplers, sessions, encoders and weight loading.

Knows nothing of DeepSpeed, MLflow, DVC, Feast or KServe.
"""

from model.config import ACTION_DIM, PRESETS, LingBotConfig, get_preset
from model.lingbot_va import LingBotVA, read_checkpoint_meta
from model.session import Session

__all__ = ["ACTION_DIM", "PRESETS", "LingBotConfig", "LingBotVA", "Session", "get_preset", "read_checkpoint_meta"]
