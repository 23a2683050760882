from masquant.adapters.base import INPUT_GROUPS, MODALITIES, ROLE_TO_GROUP, ROLES, FoldPair, ModelAdapter
from masquant.adapters.norms import NormKind
from masquant.adapters.registry import (
    adapter_class_for,
    adapter_classes,
    get_adapter,
    register_adapter,
    supported_model_types,
)

__all__ = [
    "ModelAdapter",
    "FoldPair",
    "NormKind",
    "ROLES",
    "INPUT_GROUPS",
    "ROLE_TO_GROUP",
    "MODALITIES",
    "get_adapter",
    "adapter_class_for",
    "adapter_classes",
    "register_adapter",
    "supported_model_types",
]
