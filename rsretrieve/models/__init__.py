"""Models: the CSMoE/CSMAE encoder, its registered configs, checkpoints, inference and MAC counts.

    from rsretrieve.models import load_model, get_config
    model = load_model("csmoe-p16")                 # registered config, random weights (flagged)
    model = load_model("weights.safetensors")       # rsretrieve checkpoint
"""

from rsretrieve.models.checkpoint import FORMAT, load_model, save_model
from rsretrieve.models.csmoe import CSMoE, create_model, encode
from rsretrieve.models.inference import describe_model, embed_raw, model_for_provenance
from rsretrieve.models.registry import REGISTRY, CSMoEConfig, get_config, list_models, register_config

__all__ = [
    "FORMAT",
    "REGISTRY",
    "CSMoE",
    "CSMoEConfig",
    "create_model",
    "describe_model",
    "embed_raw",
    "encode",
    "get_config",
    "list_models",
    "load_model",
    "model_for_provenance",
    "register_config",
    "save_model",
]
