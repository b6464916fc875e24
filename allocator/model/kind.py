"""What a model's quality output is, in a module of its own: loading detects it, and the outputs,
data and estimators branch on it, without importing the loader."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["ModelKind"]


class ModelKind(StrEnum):
    """What a model's quality output is (see ``model_forward_outputs``)."""

    CAUSAL_LM = "causal_lm"
    """Next-token logits ``[B, T, V]``."""
    ENCODER = "encoder"
    """Mean-pooled, L2-normalised sentence embeddings ``[B, H]``."""
    CLASSIFIER = "classifier"
    """Class logits ``[B, C]``."""
    GENERIC = "generic"
    """Logits when the model returns them, else the encoder rule."""
