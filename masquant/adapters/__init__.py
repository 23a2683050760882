from masquant.adapters.base import INPUT_GROUPS, MODALITIES, ROLE_TO_GROUP, ROLES, ModelAdapter, NormGroup
from masquant.adapters.registry import adapter_class_for, get_adapter, register_adapter, supported_model_types

__all__ = [
    "ModelAdapter",
    "NormGroup",
    "ROLES",
    "INPUT_GROUPS",
    "ROLE_TO_GROUP",
    "MODALITIES",
    "get_adapter",
    "adapter_class_for",
    "register_adapter",
    "supported_model_types",
]
