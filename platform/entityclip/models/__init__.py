"""Models: the open_clip backbone, MMAE experts, GI-ITM, and the variants built from them."""

from entityclip.models.entityclip import VARIANTS, EntityCLIP, build_model

__all__ = ["VARIANTS", "EntityCLIP", "build_model"]
