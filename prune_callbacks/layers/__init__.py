"""Layer types: the registry (`LayerPruning` per layer class), in-place surgery and FLOPs.

What a layer is and how it shrinks; knows nothing of graphs, plans or training.
"""

from . import deformable  # noqa: E402,F401  (registers DeformConv2D)
