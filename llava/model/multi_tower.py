"""Multi-tower vision encoder: Cambrian-style ensembles and towers HF Llava cannot read directly.

HF `LlavaForConditionalGeneration` drops at most one prefix token, expects `[B, N, C]` tokens and reads
`hidden_states[vision_feature_layer]`. `PivotMultiTower` wraps one or more registry towers
(llava.model.encoders) and returns a single token sequence: each member's visual tokens (prefix tokens
such as CLS and DINOv2 registers dropped, ConvNeXt maps flattened, DINOv2 read after its final norm,
which Dinov2Model never puts in `hidden_states`) resampled to a common `grid x grid` and concatenated
channel-wise (Cambrian-1, Tong et al. 2024, "spatial vision aggregation" baseline: interpolate + concat).
`needs_wrapper` says which single towers need it. `hidden_states[-1]` is the features; a lone token
tower (DINOv2 after its final norm or with registers) also returns its earlier layers, prefix dropped,
so `hidden_states` is laid out as the plain tower's (layer-wise analyses keep working).

The pixel values it receives are normalised for the first member; other members get them
de-normalised, resized to their own resolution (bicubic, antialiased when downsampling) and
re-normalised with their own mean/std, so one image processor serves the whole ensemble.

Checkpoints have `model_type: pivot_multi_tower`; importing `llava.model` registers the class with
transformers' Auto classes, which is the one thing plain transformers needs to load them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import transformers
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from llava.model.encoders import (
    ENCODER_FAMILIES,
    EncoderFamily,
    features_from_output,
    prepare_tower,
    reads_final_norm,
)


def needs_wrapper(tower: PreTrainedModel, family: EncoderFamily) -> bool:
    """Whether HF Llava cannot read this single tower's features directly (module docstring)."""
    post_norm_hidden = reads_final_norm(tower.config, family) and not family.final_norm_in_hidden_states
    return family.output != "tokens" or family.num_prefix_tokens(tower.config) > 1 or post_norm_hidden


class PivotMultiTowerConfig(PretrainedConfig):
    """Config of a multi-tower encoder.

    `towers`: list of {"family", "config" (member vision config dict), "num_prefix_tokens",
    "image_size", "grid", "mean", "std"}; `grid`: common tokens per side; `image_size`, `mean`,
    `std`: the input the wrapper receives (the first member's).
    """

    model_type = "pivot_multi_tower"

    def __init__(
        self,
        towers: list[dict] | None = None,
        grid: int = 1,
        image_size: int = 32,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        **kwargs,
    ):
        self.towers = towers or []
        self.grid = grid
        self.image_size = image_size
        self.mean = list(mean or [0.5, 0.5, 0.5])
        self.std = list(std or [0.5, 0.5, 0.5])
        self.hidden_size = sum(_member_hidden_size(t["config"]) for t in self.towers)
        self.patch_size = max(1, image_size // grid)
        super().__init__(**kwargs)


def _member_hidden_size(config: dict) -> int:
    """Channels of a member's visual tokens (ConvNeXt: the last stage's width)."""
    return int(config["hidden_sizes"][-1] if "hidden_sizes" in config else config["hidden_size"])


def _member_config(tower: dict) -> PretrainedConfig:
    config = dict(tower["config"])
    return AutoConfig.for_model(config.pop("model_type"), **config)


class PivotMultiTower(PreTrainedModel):
    """One or more vision towers read as a single `[B, grid*grid, sum(C)]` token sequence."""

    config_class = PivotMultiTowerConfig
    main_input_name = "pixel_values"
    base_model_prefix = "pivot_multi_tower"
    input_modalities = ("image",)

    def __init__(self, config: PivotMultiTowerConfig):
        super().__init__(config)
        members = []
        for tower in config.towers:
            family = ENCODER_FAMILIES[tower["family"]]
            member = getattr(transformers, family.model_class)(_member_config(tower))
            prepare_tower(member, family)
            members.append(member)
        self.members = torch.nn.ModuleList(members)
        self.post_init()

    @classmethod
    def from_members(
        cls, members: list[tuple[PreTrainedModel, str, int, int]], grid: int | None = None
    ) -> PivotMultiTower:
        """Wrap loaded towers: each item is (tower, family name, image_size, grid of that tower)."""
        towers = []
        for tower, family_name, image_size, member_grid in members:
            family = ENCODER_FAMILIES[family_name]
            towers.append(
                {
                    "family": family_name,
                    "config": tower.config.to_dict(),
                    "num_prefix_tokens": family.num_prefix_tokens(tower.config),
                    "image_size": image_size,
                    "grid": member_grid,
                    "mean": list(family.mean),
                    "std": list(family.std),
                }
            )
        first = towers[0]
        config = PivotMultiTowerConfig(
            towers=towers,
            grid=grid or first["grid"],
            image_size=first["image_size"],
            mean=first["mean"],
            std=first["std"],
        )
        model = cls(config)
        for slot, (tower, *_rest) in zip(model.members, members):
            slot.load_state_dict(tower.state_dict())
        return model.to(next(members[0][0].parameters()).dtype)

    def _member_pixels(self, pixel_values: torch.Tensor, tower: dict) -> torch.Tensor:
        size = int(tower["image_size"])
        if (
            tower["mean"] == self.config.mean
            and tower["std"] == self.config.std
            and size == self.config.image_size
        ):
            return pixel_values
        shape = (1, -1, 1, 1)
        mean_in = pixel_values.new_tensor(self.config.mean).view(shape)
        std_in = pixel_values.new_tensor(self.config.std).view(shape)
        raw = pixel_values * std_in + mean_in
        if size != pixel_values.shape[-1]:
            downsampling = size < pixel_values.shape[-1]
            raw = F.interpolate(
                raw, size=(size, size), mode="bicubic", align_corners=False, antialias=downsampling
            ).clamp(0, 1)
        mean = pixel_values.new_tensor(tower["mean"]).view(shape)
        std = pixel_values.new_tensor(tower["std"]).view(shape)
        return (raw - mean) / std

    def _to_grid(self, tokens: torch.Tensor, member_grid: int) -> torch.Tensor:
        grid = self.config.grid
        if member_grid == grid:
            return tokens
        batch, _, channels = tokens.shape
        fmap = tokens.transpose(1, 2).reshape(batch, channels, member_grid, member_grid)
        fmap = F.interpolate(fmap, size=(grid, grid), mode="bilinear", align_corners=False, antialias=True)
        return fmap.flatten(2).transpose(1, 2)

    def forward(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        features = []
        for member, tower in zip(self.members, self.config.towers):
            pixels = self._member_pixels(pixel_values.to(self.dtype), tower)
            output = member(pixels, output_hidden_states=True)
            tokens = features_from_output(member.config, output, int(tower["num_prefix_tokens"]))
            features.append(self._to_grid(tokens, int(tower["grid"])))
        hidden = torch.cat(features, dim=-1)
        hidden_states = (hidden,)
        single = self.config.towers[0] if len(self.members) == 1 else None
        if single and output.hidden_states[0].dim() == 3 and int(single["grid"]) == self.config.grid:
            prefix = int(single["num_prefix_tokens"])  # a lone token tower: its earlier layers too
            hidden_states = (*(h[:, prefix:] for h in output.hidden_states[:-1]), hidden)
        return BaseModelOutputWithPooling(last_hidden_state=hidden, hidden_states=hidden_states)


AutoConfig.register(PivotMultiTowerConfig.model_type, PivotMultiTowerConfig, exist_ok=True)
AutoModel.register(PivotMultiTowerConfig, PivotMultiTower, exist_ok=True)
