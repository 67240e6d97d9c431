"""Where the Ray Serve application used to live; kept so that existing imports and
``serve run bitdelta.serving.ray_serve:app_builder`` keep working. The code is in
:mod:`bitdelta.serving.ray` (:mod:`~bitdelta.serving.ray.settings`, :mod:`~bitdelta.serving.ray.deployment`).
"""

from .ray.deployment import app_builder, build_app, run
from .ray.settings import APP_NAME, RaySettings

__all__ = ["APP_NAME", "RaySettings", "app_builder", "build_app", "run"]
