"""popup_adapter: edge-popup supermasks for timm and Hugging Face models.

Every Linear/Conv weight keeps its random initial value; a learned score per weight picks the
top-k fraction of each layer, and only the scores train ("What's Hidden in a Randomly Weighted
Neural Network?", Ramanujan et al., CVPR 2020).

Importing this package imports neither timm nor transformers, and changes nothing in the
process (no settings, loggers, seeds or umask).
"""

__version__ = "0.1.0"  # first: the modules below may read it

from .config import INITS, METHODS, SELECTIONS, PopupConfig
from .convnets import ConvNet, create_conv_net
from .errors import (
    AdapterError,
    AlreadyAdaptedError,
    ArtifactError,
    BaseMismatchError,
    ConfigError,
    PopupError,
    TargetModulesError,
)
from .layer_kinds import PopupConv, PopupConv1D, PopupEmbedding, PopupLinear
from .layers import PopupLayer
from .model import PopupModel, get_popup_model
from .selection import masked_weight, num_kept, topk_mask
from .task_inference import AdapterInference

__all__ = [
    "INITS",
    "METHODS",
    "SELECTIONS",
    "AdapterError",
    "AdapterInference",
    "AlreadyAdaptedError",
    "ArtifactError",
    "BaseMismatchError",
    "ConfigError",
    "ConvNet",
    "PopupConfig",
    "PopupConv",
    "PopupConv1D",
    "PopupEmbedding",
    "PopupError",
    "PopupLayer",
    "PopupLinear",
    "PopupModel",
    "TargetModulesError",
    "__version__",
    "create_conv_net",
    "get_popup_model",
    "masked_weight",
    "num_kept",
    "topk_mask",
]
