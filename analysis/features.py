"""Frozen-feature extraction from exported vision encoders (docs/CONTRACTS.md §1) or any HF vision model.

Feature points (DESIGN §5): "encoder" = the visual tokens the MLLM's projector received,
`hidden_states[feature_layer][:, num_prefix_tokens:]`; "projector" = those tokens through the Stage-2
projector (`linear_2(gelu(linear_1(x)))`, the LLM's visual tokens). Poolings: "mean" over patch tokens,
"cls" (token 0; encoder point of encoders with a CLS token only) and "tokens" (no pooling, stored as
float16 for the segmentation probe). Per-layer features come from `layers` (hidden-state indices).

For a plain HF vision-model directory without export.json, the last hidden state is used and the prefix
tokens follow the encoder registry's rule for its model type (`llava.model.encoders`). That is not the
MLLM's feature point (SigLIP: penultimate layer; DINOv2/MAE/ViT: after the final norm; conformed
processors): for an "original encoder" baseline export the untrained tower with
`python -m llava.export --vision_tower NAME OUT_DIR`. A `cls_patch` export (tokens_per_image = grid² + 1)
gives patch features without its CLS token. Images go through the directory's own image processor,
always the PIL backend (torchvision is not part of the CPU install). Results are cached
on disk under a key made of the encoder checksum, the dataset identity and the options, so a re-run loads
the arrays (memory-mapped) without loading the model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from analysis.image_sources import ImageSource, center_square_crop, image_source_from_args, stable_hash
from llava.file_checks import check_safetensors, check_safetensors_in, read_json

logger = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: labels no longer cached (they come from the source)
FEATURE_POINTS = ("encoder", "projector")
POOLINGS = ("mean", "cls", "tokens")
DEFAULT_CACHE_DIR = Path(os.environ.get("PIVOT_FEATURE_CACHE", Path.home() / ".cache" / "pivot" / "features"))


def prefix_tokens(vision_config: Any) -> int:
    """Prefix tokens (CLS, registers) before the patch tokens: the encoder registry's rule for the type."""
    from llava.model.encoders import family_for_config  # its error lists every known model type

    family = family_for_config(vision_config)
    if family.output != "tokens":
        raise ValueError(f"model_type {vision_config.model_type!r} gives feature maps, not patch tokens")
    return family.num_prefix_tokens(vision_config)


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` picks CUDA when available, else CPU; anything else is passed to torch.device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def directory_checksum(path: Path) -> str:
    """sha256 over the relative paths and contents of every file below `path` (sorted)."""
    digest = hashlib.sha256()
    files = sorted(p for p in Path(path).rglob("*") if p.is_file())
    if not files:
        raise FileNotFoundError(f"{path}: no files to checksum")
    for file in files:
        digest.update(str(file.relative_to(path)).encode() + b"\0")
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- encoders
@dataclass
class EncoderSpec:
    """What is known about an encoder directory without loading its weights."""

    path: Path
    model_dir: Path
    projector_dir: Path | None
    model_type: str
    feature_layer: int
    num_prefix_tokens: int
    patch_size: int | None
    run_labels: dict[str, Any] = field(default_factory=dict)
    _checksums: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def has_cls(self) -> bool:
        return self.num_prefix_tokens > 0

    def checksum(self, part: str) -> str:
        """Checksum of "encoder" (weights + feature layer + prefix) or "projector" (its directory)."""
        if part not in self._checksums:
            if part == "projector":
                if self.projector_dir is None:
                    raise ValueError(f"{self.path}: no projector/ directory")
                self._checksums[part] = directory_checksum(self.projector_dir)
            else:
                weights = directory_checksum(self.model_dir)
                self._checksums[part] = stable_hash([weights, self.feature_layer, self.num_prefix_tokens])
        return self._checksums[part]


def read_encoder_spec(path: str | Path) -> EncoderSpec:
    """Read an exported encoder (export.json + vision_encoder/ + projector/) or a plain HF vision-model dir."""
    from transformers import AutoConfig

    path = Path(path)
    export_file = path / "export.json"
    if export_file.is_file():
        export = read_json(export_file, "export description")
        missing = [k for k in ("format_version", "feature_layer", "num_prefix_tokens") if k not in export]
        if missing or export["format_version"] != 1:
            raise ValueError(
                f"{export_file}: want format_version 1 with keys {missing} (docs/CONTRACTS.md §1)"
            )
        model_dir = path / "vision_encoder"
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{model_dir}: no config.json; not an exported encoder")
        projector_dir = path / "projector" if (path / "projector" / "config.json").is_file() else None
        model_type = read_json(model_dir / "config.json", "model config").get("model_type", "unknown")
        labels = {k: export[k] for k in ("loss_type", "vision_tower", "llm", "global_step") if k in export}
        layer, prefix = int(export["feature_layer"]), int(export["num_prefix_tokens"])
        grid = export.get("grid")
        if prefix == 0 and grid and export.get("tokens_per_image") == grid[0] * grid[1] + 1:
            # mm_vision_select_feature cls_patch: the MLLM also saw the CLS token; patch features drop it
            logger.info("%s: cls_patch export; the CLS token is left out of the patch features", path)
            prefix = 1
        return EncoderSpec(
            path,
            model_dir,
            projector_dir,
            model_type,
            layer,
            prefix,
            export.get("patch_size"),
            {"run": path.name, **labels},
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: neither export.json nor config.json; not an encoder directory")
    from llava.model.model_dirs import encoder_dir_problem  # an MLLM or LLM folder, named before loading

    problem = encoder_dir_problem(path)
    if problem:
        raise ValueError(problem)
    config = AutoConfig.from_pretrained(path)
    vision = getattr(config, "vision_config", None) or config
    try:
        prefix = prefix_tokens(vision)
    except ValueError as error:
        raise ValueError(f"{path}: {error} (or export it with export.json)") from error
    return EncoderSpec(
        path,
        path,
        None,
        vision.model_type,
        -1,
        prefix,
        getattr(vision, "patch_size", None),
        {"run": path.name, "vision_tower": str(path)},
    )


class Projector(torch.nn.Module):
    """The `mlp2x_gelu` projector of docs/CONTRACTS.md §1: linear_2(gelu(linear_1(x)))."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.linear_1 = torch.nn.Linear(in_features, hidden_features, bias=bias)
        self.act = torch.nn.GELU()
        self.linear_2 = torch.nn.Linear(hidden_features, out_features, bias=bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


def load_projector(projector_dir: Path) -> Projector:
    from safetensors.torch import load_file

    config = read_json(projector_dir / "config.json", "projector config")
    if config.get("projector_type") != "mlp2x_gelu" or config.get("act", "gelu") != "gelu":
        raise ValueError(
            f"{projector_dir}/config.json: only projector_type mlp2x_gelu with act gelu is supported"
        )
    sizes = (config["in_features"], config["hidden_features"], config["out_features"])
    projector = Projector(*sizes, bias=config.get("bias", True))
    check_safetensors(projector_dir / "model.safetensors")
    try:
        projector.load_state_dict(load_file(projector_dir / "model.safetensors"), strict=True)
    except (RuntimeError, FileNotFoundError) as error:
        raise ValueError(
            f"{projector_dir}/model.safetensors: does not match config.json ({error})"
        ) from error
    return projector.eval()


def load_processor(spec: EncoderSpec) -> Any:
    """The encoder directory's image processor, PIL backend (no torchvision needed)."""
    from transformers import AutoImageProcessor

    if not (spec.model_dir / "preprocessor_config.json").is_file():
        raise FileNotFoundError(
            f"{spec.model_dir}: no preprocessor_config.json (the encoder's image processor)"
        )
    return AutoImageProcessor.from_pretrained(spec.model_dir, backend="pil")


def processed_size(processor: Any) -> tuple[int, int]:
    """(height, width) of the pixel_values `processor` produces (probed on a non-square dummy image)."""
    pixels = processor(images=[Image.new("RGB", (97, 89))], return_tensors="pt")["pixel_values"]
    return int(pixels.shape[-2]), int(pixels.shape[-1])


def patch_grid(spec: EncoderSpec, size: tuple[int, int]) -> tuple[int, int]:
    """Patch rows and columns for an input of `size` pixels."""
    if not spec.patch_size or size[0] % spec.patch_size or size[1] % spec.patch_size:
        raise ValueError(
            f"{spec.path}: input {size} is not a whole number of {spec.patch_size}-pixel patches"
        )
    return size[0] // spec.patch_size, size[1] // spec.patch_size


@dataclass
class LoadedEncoder:
    spec: EncoderSpec
    model: torch.nn.Module
    processor: Any
    projector: Projector | None
    device: torch.device
    dtype: torch.dtype

    @torch.inference_mode()
    def hidden_states(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        kwargs: dict[str, Any] = {}
        if self.spec.model_type == "vit_mae":  # ordered noise + mask_ratio 0: no masking, no shuffling
            num_patches = self.model.embeddings.patch_embeddings.num_patches
            kwargs["noise"] = (
                torch.arange(num_patches, device=self.device).expand(len(pixel_values), -1).float()
            )
        pixel_values = pixel_values.to(self.device, self.dtype)
        return self.model(pixel_values=pixel_values, output_hidden_states=True, **kwargs).hidden_states


def load_encoder(
    spec: EncoderSpec | str | Path,
    device: str = "auto",
    dtype: torch.dtype = torch.float32,
    with_projector: bool = False,
) -> LoadedEncoder:
    """Load the vision model (its vision part for CLIP/SigLIP dual encoders), processor and projector."""
    from transformers import AutoConfig, AutoModel

    spec = spec if isinstance(spec, EncoderSpec) else read_encoder_spec(spec)
    if spec.model_type == "pivot_multi_tower":
        import llava.model  # noqa: F401  (registers the ensemble class with the Auto classes)
    if with_projector and spec.projector_dir is None:
        raise ValueError(f"{spec.path}: projector features asked for but there is no projector/ directory")
    check_safetensors_in(spec.model_dir)
    model = AutoModel.from_pretrained(
        spec.model_dir, **({"mask_ratio": 0.0} if spec.model_type == "vit_mae" else {})
    )
    if getattr(AutoConfig.from_pretrained(spec.model_dir), "vision_config", None) is not None:
        model = model.vision_model
    device_obj = resolve_device(device)
    projector = load_projector(spec.projector_dir).to(device_obj, dtype) if with_projector else None
    return LoadedEncoder(
        spec, model.to(device_obj, dtype).eval(), load_processor(spec), projector, device_obj, dtype
    )


# -------------------------------------------------------------------------------------------- extraction
@dataclass(frozen=True)
class FeatureOptions:
    """What to extract. `layers`: extra hidden-state indices for per-layer encoder features."""

    feature_points: tuple[str, ...] = ("encoder",)
    pooling: tuple[str, ...] = ("mean",)
    layers: tuple[int, ...] = ()
    batch_size: int = 64
    num_workers: int = 0
    dtype: str = "float32"
    token_dtype: str = "float16"

    def __post_init__(self) -> None:
        bad = sorted(set(self.feature_points) - set(FEATURE_POINTS)) + sorted(
            set(self.pooling) - set(POOLINGS)
        )
        if bad or not self.feature_points or not self.pooling:
            raise ValueError(
                f"FeatureOptions: feature_points ⊆ {FEATURE_POINTS}, pooling ⊆ {POOLINGS}; bad {bad}"
            )
        if self.batch_size < 1 or self.num_workers < 0:
            raise ValueError("FeatureOptions: batch_size must be ≥ 1 and num_workers ≥ 0")
        if self.dtype not in ("float32", "bfloat16", "float16") or self.token_dtype not in (
            "float32",
            "float16",
        ):
            raise ValueError(
                "FeatureOptions: dtype ∈ {float32, bfloat16, float16}, token_dtype ∈ {float32, float16}"
            )

    def targets(self) -> list[tuple[str, str, int | None]]:
        """(feature point, pooling, layer) of every array; cls pooling applies to the encoder point only."""
        pairs = [
            (p, pool)
            for p in self.feature_points
            for pool in self.pooling
            if (p, pool) != ("projector", "cls")
        ]
        return [(p, pool, None) for p, pool in pairs] + [
            ("encoder", q, n) for n in self.layers for q in self.pooling
        ]

    def names(self) -> list[str]:
        return [feature_name(*target) for target in self.targets()]


def feature_name(point: str, pooling: str, layer: int | None = None) -> str:
    """Array name in a FeatureSet: "encoder.mean", "projector.tokens", "encoder.layer3.cls", ..."""
    return f"{point}.{pooling}" if layer is None else f"{point}.layer{layer}.{pooling}"


@dataclass
class FeatureSet:
    arrays: dict[str, np.ndarray]
    labels: np.ndarray | None
    class_names: list[str] | None
    meta: dict[str, Any]

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.arrays:
            raise KeyError(f"feature {name!r} not extracted; available: {sorted(self.arrays)}")
        return self.arrays[name]


class _PixelDataset(torch.utils.data.Dataset):
    def __init__(self, source: ImageSource, processor: Any, size: tuple[int, int]) -> None:
        self.source, self.processor, self.size = source, processor, size

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, position: int) -> torch.Tensor:
        image = self.source.load(position).convert("RGB")
        kwargs: dict[str, Any] = {}
        if self.source.square_crop:  # crop + resize here, so pixels align with masks cropped the same way
            resample = getattr(self.processor, "resample", Image.BICUBIC)
            image = center_square_crop(image).resize((self.size[1], self.size[0]), resample)
            kwargs = {"do_resize": False, "do_center_crop": False}
        return self.processor(images=[image], return_tensors="pt", **kwargs)["pixel_values"][0]


def _pool(tokens: torch.Tensor, hidden: torch.Tensor, pooling: str) -> torch.Tensor:
    if pooling == "mean":
        return tokens.float().mean(dim=1)
    return hidden[:, 0].float() if pooling == "cls" else tokens


def cache_key(spec: EncoderSpec, source: ImageSource, options: FeatureOptions) -> str:
    parts = {"encoder": spec.checksum("encoder"), "dataset": source.identity(), "version": CACHE_VERSION}
    if "projector" in options.feature_points:
        parts["projector"] = spec.checksum("projector")
    parts["options"] = {k: v for k, v in asdict(options).items() if k not in ("batch_size", "num_workers")}
    return stable_hash(parts)


def extract_features(
    encoder: EncoderSpec | LoadedEncoder | str | Path,
    source: ImageSource,
    options: FeatureOptions = FeatureOptions(),
    cache_dir: str | Path | None = DEFAULT_CACHE_DIR,
    device: str = "auto",
    progress: bool = True,
) -> FeatureSet:
    """Features of every image in `source`; loaded from the cache when this exact extraction ran before."""
    spec = encoder.spec if isinstance(encoder, LoadedEncoder) else encoder
    spec = spec if isinstance(spec, EncoderSpec) else read_encoder_spec(spec)
    if "cls" in options.pooling and not spec.has_cls:
        raise ValueError(
            f"{spec.path}: cls pooling asked for but {spec.model_type} has no CLS token; use mean"
        )
    wants_projector = "projector" in options.feature_points
    loaded_without_projector = isinstance(encoder, LoadedEncoder) and encoder.projector is None
    if wants_projector and (spec.projector_dir is None or loaded_without_projector):
        raise ValueError(f"{spec.path}: projector feature point asked for but no projector is available")
    if len(source) == 0:
        raise ValueError(f"{source.name}: no images to extract features from")
    cache_path = None
    if cache_dir is not None:
        key = cache_key(spec, source, options)
        cache_path = Path(cache_dir) / key[:2] / key
        if (cache_path / "meta.json").is_file():
            logger.info("features for %s on %s: cache hit %s", spec.path, source.name, cache_path)
            return _read_cache(cache_path, source)
    if not isinstance(encoder, LoadedEncoder):
        encoder = load_encoder(spec, device, getattr(torch, options.dtype), with_projector=wants_projector)
    meta = {
        "encoder": str(spec.path),
        "dataset": source.name,
        "n": len(source),
        "options": asdict(options),
        "run_labels": spec.run_labels,
        "class_names": source.class_names,
    }
    if cache_path is None:
        return FeatureSet(
            _run_extraction(encoder, source, options, None, progress), source.labels, source.class_names, meta
        )
    staging = cache_path.with_name(f"{cache_path.name}.tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        for array in _run_extraction(encoder, source, options, staging, progress).values():
            array.flush()
        (staging / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
        if cache_path.exists():  # another process finished first: keep its copy
            shutil.rmtree(staging)
        else:
            os.replace(staging, cache_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("features cached at %s", cache_path)
    return _read_cache(cache_path, source)


@torch.inference_mode()
def _run_extraction(
    encoder: LoadedEncoder, source: ImageSource, options: FeatureOptions, staging: Path | None, progress: bool
) -> dict[str, np.ndarray]:
    """Arrays in memory, or memory-mapped .npy files under `staging` (tokens of big datasets exceed RAM)."""
    spec, prefix = encoder.spec, encoder.spec.num_prefix_tokens
    size = processed_size(encoder.processor)
    dataset = _PixelDataset(source, encoder.processor, size)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=options.batch_size, num_workers=options.num_workers
    )
    arrays: dict[str, np.ndarray] = {}
    start = 0
    for pixel_values in tqdm(loader, desc=f"features {spec.path.name}", disable=not progress):
        hidden_states = encoder.hidden_states(pixel_values)
        hidden = hidden_states[spec.feature_layer]
        tokens = hidden[:, prefix:]
        if start == 0 and spec.patch_size and tokens.shape[1] != np.prod(patch_grid(spec, size)):
            raise ValueError(
                f"{spec.path}: {tokens.shape[1]} tokens after dropping {prefix} prefix tokens, but "
                f"{size} pixels make {np.prod(patch_grid(spec, size))} patches; check num_prefix_tokens"
            )
        projected = encoder.projector(tokens) if "projector" in options.feature_points else None
        for point, pooling, layer in options.targets():
            layer_hidden = hidden if layer is None else hidden_states[layer]
            values = _pool(
                projected if point == "projector" else layer_hidden[:, prefix:], layer_hidden, pooling
            )
            name = feature_name(point, pooling, layer)
            if name not in arrays:
                dtype = np.dtype(options.token_dtype if pooling == "tokens" else "float32")
                shape = (len(source), *values.shape[1:])
                arrays[name] = (
                    np.empty(shape, dtype)
                    if staging is None
                    else np.lib.format.open_memmap(staging / f"{name}.npy", "w+", dtype, shape)
                )
            arrays[name][start : start + len(values)] = values.float().cpu().numpy()
        start += len(pixel_values)
    return arrays


def _read_cache(cache_path: Path, source: ImageSource) -> FeatureSet:
    """Cached features; labels and class names are the source's own (the cache key covers only images)."""
    meta = read_json(cache_path / "meta.json", "feature cache description")
    arrays = {p.stem: np.load(p, mmap_mode="r") for p in sorted(cache_path.glob("*.npy"))}
    return FeatureSet(arrays, source.labels, source.class_names, meta)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", required=True, help="exported encoder dir or HF vision-model dir")
    parser.add_argument("--data", required=True, help="ImageFolder root or `datasets.save_to_disk` directory")
    parser.add_argument(
        "--data_format",
        "--data-format",
        choices=["imagefolder", "hf"],
        default="imagefolder",
        help="--data layout",
    )
    parser.add_argument(
        "--split", default=None, help="split sub-folder (imagefolder) or DatasetDict split (hf)"
    )
    parser.add_argument(
        "--feature_points",
        "--feature-points",
        nargs="+",
        default=["encoder"],
        choices=FEATURE_POINTS,
        help="where",
    )
    parser.add_argument("--pooling", nargs="+", default=["mean"], choices=POOLINGS, help="token pooling(s)")
    parser.add_argument("--layers", nargs="*", type=int, default=[], help="extra hidden-state indices")
    parser.add_argument("--batch_size", "--batch-size", type=int, default=64, help="images per forward pass")
    parser.add_argument(
        "--num_workers", "--num-workers", type=int, default=0, help="DataLoader workers decoding images"
    )
    parser.add_argument(
        "--dtype", default="float32", help="encoder compute dtype (float32, bfloat16, float16)"
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda:0, ...")
    parser.add_argument(
        "--cache_dir",
        "--cache-dir",
        default=str(DEFAULT_CACHE_DIR),
        help="cache root (env PIVOT_FEATURE_CACHE)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    options = FeatureOptions(
        tuple(args.feature_points),
        tuple(args.pooling),
        tuple(args.layers),
        args.batch_size,
        args.num_workers,
        args.dtype,
    )
    source = image_source_from_args(args.data, args.data_format, args.split)
    features = extract_features(args.encoder, source, options, args.cache_dir, args.device)
    for name, array in features.arrays.items():
        print(f"{name}\t{tuple(array.shape)}\t{array.dtype}")


if __name__ == "__main__":
    main()
