"""Serve import path: `serve run serve/config.yaml` (or `serve deploy` to a cluster / RayService).

The builder reads the run's config (storage root, variant, serve settings) from the
application args and serves that run's checkpoint and index; see entityclip.serving.app.
"""

from entityclip.serving.app import app_builder

__all__ = ["app_builder"]
