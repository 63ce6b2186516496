"""Typed YAML configs: the schema lives in `schema.py`, ready-made files beside it."""

from configs.schema import CONFIG_DIR, EngineConfig, EvalConfig, LabelConfig, ModelConfig, RunConfig, TrainConfig, WorldConfig, derive, load_config, save_config

__all__ = ["CONFIG_DIR", "EngineConfig", "EvalConfig", "LabelConfig", "ModelConfig", "RunConfig", "TrainConfig", "WorldConfig", "derive", "load_config", "save_config"]
