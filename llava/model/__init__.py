"""Model side of pivot: encoder registry, presets, builder.

Importing it registers the multi-tower vision encoder with transformers' Auto classes.
"""

from llava.model import multi_tower as _multi_tower  # noqa: F401
