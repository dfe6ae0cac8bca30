"""How many `<image>` tokens an image becomes, for a built model's config.

Square models (LlavaForConditionalGeneration): `image_seq_length` tokens per image, whatever its size.
Anyres models (LlavaOnevisionForConditionalGeneration, `anyres_max_N`): the base tile's grid, plus the
best-fitting tiling unpadded to the image's aspect ratio, downscaled when it exceeds N tiles, plus one
`image_newline` per row. The count reuses transformers' own `select_best_resolution` and
`unpad_image`, so it agrees with `LlavaOnevisionModel.pack_image_features` by construction.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from transformers import PretrainedConfig
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_onevision.modeling_llava_onevision import unpad_image


def image_token_counter(config: PretrainedConfig) -> Callable[[int, int], int]:
    """A function (height, width) of the original image → number of visual tokens."""
    if config.model_type == "llava":
        count = int(config.image_seq_length)
        return lambda height, width: count
    if config.model_type != "llava_onevision":
        raise ValueError(f"No image-token rule for model_type {config.model_type!r}.")
    vision = config.vision_config
    tile = int(vision.image_size)
    grid = tile // int(vision.patch_size)
    pinpoints = [list(p) for p in config.image_grid_pinpoints]
    max_tiles = int(config.vision_aspect_ratio.removeprefix("anyres_max_"))

    def count(height: int, width: int) -> int:
        best_h, best_w = select_best_resolution([height, width], pinpoints)
        rows, cols = grid * (best_h // tile), grid * (best_w // tile)
        unpadded = unpad_image(torch.empty(1, rows, cols), torch.tensor([height, width]))
        cur_h, cur_w = unpadded.shape[1:]
        ratio = math.sqrt(cur_h * cur_w / (max_tiles * grid**2))
        if ratio > 1.1:
            cur_h, cur_w = int(cur_h // ratio), int(cur_w // ratio)
        return grid * grid + cur_h * (cur_w + 1)

    return count
