"""GPT-2 / GPT-3 models in flax NNX with logical axis names on every parameter."""
from models.attention import attend, attention_mask, check_attention_length, resolve_attention
from models.gpt import GPT, GPTConfig
from models.partitioning import MESH_AXES, RULES, constrain, logical_to_spec, param_specs
from models.presets import PRESETS, model_config
from models.summary import abstract_params, count_params

__all__ = [
    "GPT", "GPTConfig", "attend", "attention_mask", "check_attention_length", "resolve_attention", "MESH_AXES",
    "RULES", "constrain", "logical_to_spec", "param_specs", "PRESETS", "model_config", "abstract_params",
    "count_params",
]
