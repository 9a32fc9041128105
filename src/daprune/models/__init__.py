"""Model families (adapters) and model loading."""

from daprune.models.adapter import BlockAdapter, ModelAdapter, get_adapter, supported_model_types

__all__ = ["BlockAdapter", "ModelAdapter", "get_adapter", "supported_model_types"]
