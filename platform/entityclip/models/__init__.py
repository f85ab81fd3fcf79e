"""Models: the open_clip backbone, MMAE experts, GI-ITM, the variants built from them, and
their checkpoints (checkpoint.py)."""

from entityclip.models.entityclip import VARIANTS, EntityCLIP, build_model

__all__ = ["VARIANTS", "EntityCLIP", "build_model"]
