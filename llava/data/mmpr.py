"""MMPR-v1.2 converter: ``meta.json`` + annotation jsonl → a DPO json and an SFT json with shared ids.

Follows the Stage-2 data of Song et al. 2025 ("RL makes MLLMs see better than SFT", arXiv
2510.16333) and PIVOT's MMPR sampler (seed 777, 20K samples, token limit 1500 on prompt + chosen),
with the record formats of DESIGN §3 / docs/CONTRACTS.md §3:

- DPO (LLaVA-NeXT): ``{"id", "image"?, "prompt", "chosen", "rejected", "meta"}``
- SFT (LLaVA): ``{"id", "image"?, "conversations": [human: prompt, gpt: chosen], "meta"}``

Both files hold the same samples in the same order with the same ids, so SFT and DPO train on
identical data. Pipeline:

1. Read every dataset of ``meta.json`` (sorted by name; ``root`` and ``annotation`` may be relative
   to the meta file's directory) and every line of its annotation file (in file order).
2. Validate each line: malformed lines (bad JSON, missing/empty fields, ``<image>`` in a response,
   a placeholder count that does not match the images) and lines whose image files are missing are
   collected; they raise :class:`MMPRInputError` naming file and line, or with ``skip_missing`` are
   written to ``mmpr_skipped.jsonl`` with their reasons. Nothing is dropped silently.
3. Keep single-image, multi-image (``image`` list) and text-only items (``image_only`` drops the
   latter two, counted). A prompt lacking ``<image>`` gets one ``"<image>\\n"`` per image prepended.
4. Apply the named filters (``llava.data.mmpr_filters.FILTERS``: under30, nothink).
5. Seeded sample: a ``random.Random(seed)`` permutation of the candidates is walked in order and
   the first ``size`` items within the token limit are taken (a uniform sample without replacement
   of the items passing every filter, in random order; tokens are counted only as far as needed).
   With ``shift_ratio`` r the "long or tagged" and the other items are two pools sampled to
   round(size·r/100) and the rest, then shuffled together.

Ids are ``"<dataset name>/<1-based line number>"``. ``meta`` holds the source dataset name and line
(``source_dataset``, ``source_line``) and every extra annotation key (e.g. ``box``, ``answer_type``).
Image paths are written relative to ``image_folder`` when given (the training ``--image_folder``),
else absolute. Usage: ``python -m llava.data.mmpr --meta_path MMPR/meta.json --out_dir data/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llava.data.errors import RecordError
from llava.data.mmpr_filters import (
    FILTERS,
    REASONING_TAGS,
    TokenCounter,
    is_long_or_tagged,
    load_token_counter,
    token_limit_text,
)

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
RESPONSE_KEYS = ("question", "chosen", "rejected")
META_KEYS = ("source_dataset", "source_line")
DPO_FILENAME = "mmpr_dpo.json"
SFT_FILENAME = "mmpr_sft.json"
REPORT_FILENAME = "mmpr_report.json"
SKIPPED_FILENAME = "mmpr_skipped.jsonl"
TOKEN_BATCH = 1024
MAX_LISTED_ISSUES = 20


@dataclass
class MMPRConfig:
    """Settings of one conversion (defaults: PIVOT's sampler)."""

    meta_path: str
    size: int = 20_000
    seed: int = 777
    token_limit: int = 1500
    tokenizer: str | None = None
    filters: tuple[str, ...] = ()
    shift_ratio: int | None = None
    image_only: bool = False
    skip_missing: bool = False
    allow_fewer: bool = False
    image_folder: str | None = None

    def __post_init__(self) -> None:
        if not Path(self.meta_path).is_file():
            raise ValueError(f"meta_path {self.meta_path!r} is not a file (expected MMPR-v1.2 meta.json)")
        if self.size <= 0:
            raise ValueError(f"size must be a positive number of samples, got {self.size}")
        if self.token_limit < 0:
            raise ValueError(f"token_limit must be >= 0 (0 disables it), got {self.token_limit}")
        unknown = [f for f in self.filters if f not in FILTERS]
        if unknown:
            raise ValueError(f"unknown filter(s) {unknown}; choose from {sorted(FILTERS)}")
        self.filters = tuple(name for name in FILTERS if name in self.filters)
        if self.shift_ratio is not None and not 0 <= self.shift_ratio <= 100:
            raise ValueError(f"shift_ratio is a percentage in 0..100, got {self.shift_ratio}")
        if self.image_folder is not None and not Path(self.image_folder).is_dir():
            raise ValueError(f"image_folder {self.image_folder!r} is not a directory")


@dataclass(frozen=True)
class DatasetSource:
    """One ``meta.json`` entry with its paths resolved."""

    name: str
    root: Path
    annotation: Path


@dataclass(frozen=True)
class Issue:
    """A line that cannot become a sample (malformed, or with missing image files)."""

    kind: str
    dataset: str
    path: str
    line: int
    reason: str

    @property
    def record_id(self) -> str:
        return f"{self.dataset}/{self.line}"

    def to_json(self) -> dict[str, Any]:
        return {"id": self.record_id, **asdict(self)}


class MMPRInputError(RecordError):
    """Bad MMPR input lines; ``.issues`` lists all, ``.path/.record_id/.reason`` name the first."""

    def __init__(self, issues: Sequence[Issue]) -> None:
        self.issues = list(issues)
        first = self.issues[0]
        super().__init__(first.path, first.record_id, first.reason)
        listed = "\n".join(
            f"  {i.path}:{i.line} [{i.record_id}] {i.kind}: {i.reason}"
            for i in self.issues[:MAX_LISTED_ISSUES]
        )
        more = len(self.issues) - MAX_LISTED_ISSUES
        tail = f"\n  ... and {more} more" if more > 0 else ""
        self.args = (
            f"{len(self.issues)} MMPR annotation line(s) cannot be converted:\n{listed}{tail}\n"
            f"Fix the input, or pass --skip_missing to skip them (listed in {SKIPPED_FILENAME}).",
        )

    def __reduce__(self) -> tuple[type, tuple[list[Issue]]]:
        return (type(self), (self.issues,))


class InsufficientSamplesError(ValueError):
    """Fewer items pass the filters than ``size`` asks for (and ``allow_fewer`` is off)."""


@dataclass(frozen=True)
class MMPRItem:
    """A validated annotation line, ready to become a DPO and an SFT record."""

    dataset: str
    line: int
    images: tuple[str, ...]
    prompt: str
    chosen: str
    rejected: str
    extra: dict[str, Any]
    image_token_added: bool = False

    @property
    def id(self) -> str:
        return f"{self.dataset}/{self.line}"

    @property
    def kind(self) -> str:
        return {0: "text_only", 1: "single_image"}.get(len(self.images), "multi_image")


@dataclass
class DatasetStats:
    """Per-dataset counts for the report."""

    annotation: str
    root: str
    root_exists: bool
    read: int = 0
    blank_lines: int = 0
    malformed: int = 0
    missing_image: int = 0
    single_image: int = 0
    multi_image: int = 0
    text_only: int = 0
    image_token_added: int = 0
    kept_after: dict[str, int] = field(default_factory=dict)
    token_checked: int = 0
    token_over_limit: int = 0
    sampled: int = 0
    sampled_long_or_tagged: int = 0


@dataclass
class MMPRConversion:
    """The converted records (same order, same ids), the skipped lines and the report."""

    dpo: list[dict[str, Any]]
    sft: list[dict[str, Any]]
    skipped: list[Issue]
    report: dict[str, Any]


def read_meta(meta_path: str | Path) -> list[DatasetSource]:
    """Parse ``meta.json`` into dataset sources sorted by name (paths relative to its directory)."""
    meta_path = Path(meta_path)

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise ValueError(f"{meta_path}: duplicate key(s) {dupes}")
        return dict(pairs)

    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"), object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as err:
        raise ValueError(f"{meta_path}: not valid JSON ({err})") from err
    if not isinstance(meta, dict) or not meta:
        raise ValueError(f"{meta_path}: expected a non-empty object mapping dataset names to entries")
    sources = []
    for name in sorted(meta):
        entry = meta[name]
        if not isinstance(entry, dict) or not all(
            isinstance(entry.get(k), str) for k in ("root", "annotation")
        ):
            raise ValueError(f"{meta_path}: dataset {name!r} needs string fields 'root' and 'annotation'")
        annotation = meta_path.parent / entry["annotation"]
        if not annotation.is_file():
            raise ValueError(f"{meta_path}: annotation file of dataset {name!r} not found: {annotation}")
        sources.append(DatasetSource(name, meta_path.parent / entry["root"], annotation))
    return sources


def _parse_images(value: Any) -> tuple[str, ...] | str:
    """The image list of a line, or a reason string when the ``image`` field is malformed."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        return f"'image' must be a non-empty path or a non-empty list of paths, got {value!r}"
    return tuple(value)


def parse_line(raw: str, source: DatasetSource, line: int, image_folder: str | None) -> MMPRItem | Issue:
    """Validate one annotation line; an :class:`Issue` explains why it cannot become a sample."""

    def issue(kind: str, reason: str) -> Issue:
        return Issue(kind, source.name, str(source.annotation), line, reason)

    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as err:
        return issue("malformed", f"invalid JSON ({err})")
    if not isinstance(obj, dict):
        return issue("malformed", f"expected a JSON object, got {type(obj).__name__}")
    for key in RESPONSE_KEYS:
        if not isinstance(obj.get(key), str):
            return issue("malformed", f"missing or non-string {key!r}")
    question, chosen, rejected = (obj[k] for k in RESPONSE_KEYS)
    for key, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            return issue("malformed", f"empty {key!r}")
        if IMAGE_TOKEN in text:
            return issue("malformed", f"{key!r} contains the {IMAGE_TOKEN} placeholder")
    clashes = [k for k in META_KEYS if k in obj]
    if clashes:
        return issue("malformed", f"extra key(s) {clashes} clash with the converter's meta keys")
    images = _parse_images(obj.get("image"))
    if isinstance(images, str):
        return issue("malformed", images)
    placeholders = question.count(IMAGE_TOKEN)
    if placeholders not in (0, len(images)):
        return issue(
            "malformed",
            f"question has {placeholders} {IMAGE_TOKEN} placeholder(s) for {len(images)} image(s)",
        )
    paths = [os.path.abspath(source.root / image) for image in images]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        return issue("missing_image", f"{len(missing)} image file(s) not found: {missing[:3]}")
    if image_folder is not None:
        folder = os.path.abspath(image_folder)
        paths = [os.path.relpath(p, folder) for p in paths]
        outside = [p for p in paths if p.split(os.sep)[0] == os.pardir]
        if outside:
            raise ValueError(
                f"{source.annotation}:{line}: image {outside[0]!r} lies outside --image_folder {folder}; "
                "pass the common parent of all MMPR image roots, or omit --image_folder for absolute paths"
            )
    add_tokens = bool(images) and not placeholders
    prompt = f"{IMAGE_TOKEN}\n" * len(images) + question if add_tokens else question
    extra = {k: v for k, v in obj.items() if k not in (*RESPONSE_KEYS, "image")}
    return MMPRItem(source.name, line, tuple(paths), prompt, chosen, rejected, extra, add_tokens)


def read_dataset(
    source: DatasetSource, image_folder: str | None, stats: DatasetStats
) -> tuple[list[MMPRItem], list[Issue]]:
    """All valid items and all issues of one annotation file, counting into ``stats``."""
    items: list[MMPRItem] = []
    issues: list[Issue] = []
    with source.annotation.open(encoding="utf-8") as handle:
        for line, raw in enumerate(handle, start=1):
            if not raw.strip():
                stats.blank_lines += 1
                continue
            stats.read += 1
            parsed = parse_line(raw, source, line, image_folder)
            # Issue.kind and MMPRItem.kind name DatasetStats counters.
            setattr(stats, parsed.kind, getattr(stats, parsed.kind) + 1)
            if isinstance(parsed, Issue):
                issues.append(parsed)
            else:
                stats.image_token_added += int(parsed.image_token_added)
                items.append(parsed)
    return items, issues


def apply_filters(items: list[MMPRItem], cfg: MMPRConfig, stats: dict[str, DatasetStats]) -> list[MMPRItem]:
    """Drop items by ``image_only`` and the named filters, recording per-dataset survivors."""
    stages: list[tuple[str, Any]] = [("valid", lambda item: True)]
    if cfg.image_only:
        stages.append(("image_only", lambda item: item.kind == "single_image"))
    stages += [(name, lambda item, keep=FILTERS[name]: keep(item.chosen)) for name in cfg.filters]
    for stage, keep in stages:
        items = [item for item in items if keep(item)]
        for dataset_stats in stats.values():
            dataset_stats.kept_after[stage] = 0
        for item in items:
            stats[item.dataset].kept_after[stage] += 1
    return items


def shift_targets(size: int, ratio: int) -> tuple[int, int]:
    """(long-or-tagged, other) sample counts for ``ratio`` percent long-or-tagged (half rounds up)."""
    n_long = math.floor(size * ratio / 100 + 0.5)
    return n_long, size - n_long


def _take_within_limit(
    order: list[MMPRItem], target: int, cfg: MMPRConfig, counter: TokenCounter, stats: dict[str, DatasetStats]
) -> tuple[list[MMPRItem], bool]:
    """The first ``target`` items of ``order`` within the token limit; also whether all were examined."""
    if cfg.token_limit == 0:
        return order[:target], target >= len(order)
    taken: list[MMPRItem] = []
    examined = 0
    while len(taken) < target and examined < len(order):
        batch = order[examined : examined + TOKEN_BATCH]
        counts = counter.count([token_limit_text(item.prompt, item.chosen) for item in batch])
        for item, n_tokens in zip(batch, counts):
            examined += 1
            stats[item.dataset].token_checked += 1
            if n_tokens > cfg.token_limit:
                stats[item.dataset].token_over_limit += 1
            else:
                taken.append(item)
            if len(taken) == target:
                break
    return taken, examined == len(order)


def sample_items(
    items: list[MMPRItem], cfg: MMPRConfig, counter: TokenCounter, stats: dict[str, DatasetStats]
) -> tuple[list[MMPRItem], dict[str, Any]]:
    """Seeded sample of ``cfg.size`` items (see module docstring); returns it and sampling facts."""
    rng = random.Random(cfg.seed)
    if cfg.shift_ratio is None:
        pools = [("all", items, cfg.size)]
    else:
        n_long, n_other = shift_targets(cfg.size, cfg.shift_ratio)
        long_pool = [item for item in items if is_long_or_tagged(item.chosen)]
        other_pool = [item for item in items if not is_long_or_tagged(item.chosen)]
        pools = [("long_or_tagged", long_pool, n_long), ("other", other_pool, n_other)]
    selected: list[MMPRItem] = []
    facts: dict[str, Any] = {"pools": {}, "token_counts_complete": True}
    for name, pool, target in pools:
        taken, complete = _take_within_limit(rng.sample(pool, len(pool)), target, cfg, counter, stats)
        facts["pools"][name] = {"available": len(pool), "target": target, "sampled": len(taken)}
        facts["token_counts_complete"] &= complete
        if len(taken) < target and not cfg.allow_fewer:
            raise InsufficientSamplesError(
                f"only {len(taken)} of the requested {target} samples ({name} pool) pass the filters and "
                f"the token limit {cfg.token_limit} ({len(pool)} before the token limit); lower --size "
                "or pass --allow_fewer"
            )
        selected += taken
    if cfg.shift_ratio is not None:
        rng.shuffle(selected)
    for item in selected:
        stats[item.dataset].sampled += 1
        stats[item.dataset].sampled_long_or_tagged += int(is_long_or_tagged(item.chosen))
    return selected, facts


def _image_field(item: MMPRItem) -> dict[str, Any]:
    if not item.images:
        return {}
    return {"image": item.images[0] if len(item.images) == 1 else list(item.images)}


def _meta(item: MMPRItem) -> dict[str, Any]:
    return {"source_dataset": item.dataset, "source_line": item.line, **item.extra}


def to_dpo_record(item: MMPRItem) -> dict[str, Any]:
    """LLaVA-NeXT preference record ``{"id", "image"?, "prompt", "chosen", "rejected", "meta"}``."""
    return {
        "id": item.id,
        **_image_field(item),
        "prompt": item.prompt,
        "chosen": item.chosen,
        "rejected": item.rejected,
        "meta": _meta(item),
    }


def to_sft_record(item: MMPRItem) -> dict[str, Any]:
    """LLaVA conversation record with the chosen response as the assistant turn."""
    conversations = [{"from": "human", "value": item.prompt}, {"from": "gpt", "value": item.chosen}]
    return {"id": item.id, **_image_field(item), "conversations": conversations, "meta": _meta(item)}


def _totals(stats: dict[str, DatasetStats]) -> dict[str, Any]:
    """Sum of the per-dataset counters (``meta.json`` has at least one dataset)."""
    per_dataset = [asdict(s) for s in stats.values()]
    counters = [k for k, v in per_dataset[0].items() if type(v) is int]
    totals: dict[str, Any] = {k: sum(d[k] for d in per_dataset) for k in counters}
    totals["kept_after"] = {
        stage: sum(d["kept_after"][stage] for d in per_dataset) for stage in per_dataset[0]["kept_after"]
    }
    return totals


def convert_mmpr(cfg: MMPRConfig) -> MMPRConversion:
    """Read, validate, filter and sample MMPR; the records are returned, not written."""
    sources = read_meta(cfg.meta_path)
    counter = load_token_counter(cfg.tokenizer)
    if cfg.tokenizer is None and cfg.token_limit:
        logger.warning("no --tokenizer given: token limit uses the approximation %s", counter.description)
    stats: dict[str, DatasetStats] = {}
    items: list[MMPRItem] = []
    issues: list[Issue] = []
    for source in sources:
        root_exists = source.root.is_dir()
        if not root_exists:
            logger.warning("image root of dataset %r does not exist: %s", source.name, source.root)
        stats[source.name] = DatasetStats(
            os.path.abspath(source.annotation), os.path.abspath(source.root), root_exists
        )
        dataset_items, dataset_issues = read_dataset(source, cfg.image_folder, stats[source.name])
        items += dataset_items
        issues += dataset_issues
    if issues and not cfg.skip_missing:
        raise MMPRInputError(issues)
    candidates = apply_filters(items, cfg, stats)
    selected, facts = sample_items(candidates, cfg, counter, stats)
    report = {
        "settings": asdict(cfg),
        "tokenizer": {"name": counter.name, "method": counter.description},
        "reasoning_tags": list(REASONING_TAGS),
        "datasets": {name: asdict(s) for name, s in stats.items()},
        "totals": _totals(stats),
        "sampled": {
            "total": len(selected),
            "long_or_tagged": sum(is_long_or_tagged(item.chosen) for item in selected),
            **{
                kind: sum(item.kind == kind for item in selected)
                for kind in ("single_image", "multi_image", "text_only")
            },
        },
        "sampling": facts,
    }
    return MMPRConversion(
        dpo=[to_dpo_record(item) for item in selected],
        sft=[to_sft_record(item) for item in selected],
        skipped=issues,
        report=report,
    )


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def write_conversion(conversion: MMPRConversion, dpo_out: str | Path, sft_out: str | Path) -> dict[str, Path]:
    """Write the DPO and SFT json, and next to the DPO json the report (and skipped lines, if any run
    was allowed to skip). Returns the written paths; the report records them under ``outputs``."""
    dpo_out, sft_out = Path(dpo_out), Path(sft_out)
    paths = {"dpo": dpo_out, "sft": sft_out, "report": dpo_out.parent / REPORT_FILENAME}
    if conversion.report["settings"]["skip_missing"]:
        paths["skipped"] = dpo_out.parent / SKIPPED_FILENAME
    _write_json(dpo_out, conversion.dpo)
    _write_json(sft_out, conversion.sft)
    if "skipped" in paths:
        lines = [json.dumps(issue.to_json(), ensure_ascii=False) + "\n" for issue in conversion.skipped]
        paths["skipped"].write_text("".join(lines), encoding="utf-8")
    conversion.report["outputs"] = {k: str(p) for k, p in paths.items()}
    _write_json(paths["report"], conversion.report)
    return paths


def format_summary(report: dict[str, Any]) -> str:
    """Human-readable summary of a conversion report."""
    settings = report["settings"]
    lines = [
        f"MMPR conversion: size {settings['size']}, seed {settings['seed']}, token limit "
        f"{settings['token_limit'] or 'off'} ({report['tokenizer']['name']}), filters "
        f"{list(settings['filters']) or 'none'}, shift_ratio {settings['shift_ratio']}, "
        f"image_only {settings['image_only']}",
        f"{'dataset':<28}{'read':>8}{'malformed':>10}{'missing':>9}{'multi':>7}{'text':>7}{'kept':>8}"
        f"{'>limit':>8}{'sampled':>9}",
    ]
    rows = [*report["datasets"].items(), ("TOTAL", report["totals"])]
    for name, s in rows:
        kept = list(s["kept_after"].values())[-1] if s["kept_after"] else 0
        lines.append(
            f"{name:<28}{s['read']:>8}{s['malformed']:>10}{s['missing_image']:>9}{s['multi_image']:>7}"
            f"{s['text_only']:>7}{kept:>8}{s['token_over_limit']:>8}{s['sampled']:>9}"
        )
    sampled = report["sampled"]
    lines.append(
        f"sampled {sampled['total']}: {sampled['single_image']} single-image, {sampled['multi_image']} "
        f"multi-image, {sampled['text_only']} text-only, {sampled['long_or_tagged']} long or tagged"
    )
    if not report["sampling"]["token_counts_complete"]:
        lines.append("token-limit counts cover only the items examined in sampling order")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llava.data.mmpr",
        description="Convert MMPR-v1.2 (meta.json + annotation jsonl) into a DPO json and an SFT json "
        "with shared ids, plus mmpr_report.json next to the DPO json.",
    )
    parser.add_argument("--meta_path", required=True, help="MMPR-v1.2 meta.json")
    parser.add_argument("--out_dir", help=f"write {DPO_FILENAME} and {SFT_FILENAME} here")
    parser.add_argument("--dpo_out", help="DPO json path (with --sft_out, instead of --out_dir)")
    parser.add_argument("--sft_out", help="SFT json path (with --dpo_out, instead of --out_dir)")
    parser.add_argument("--size", type=int, default=20_000, help="number of samples (paper: 20K)")
    parser.add_argument("--seed", type=int, default=777, help="sampling seed (PIVOT: 777)")
    parser.add_argument(
        "--token_limit",
        type=int,
        default=1500,
        help="max tokens of prompt + chosen (PIVOT: 1500); 0 disables",
    )
    parser.add_argument(
        "--tokenizer",
        help="tokenizer path or hub id for the token limit (e.g. Qwen/Qwen2.5-1.5B-Instruct); without it "
        "tokens are approximated as max(words, ceil(chars / 4)) and the report says so",
    )
    parser.add_argument(
        "--filters",
        nargs="*",
        default=[],
        choices=sorted(FILTERS),
        help="under30: chosen < 30 words; nothink: no reasoning tags and chosen < 60 words",
    )
    parser.add_argument(
        "--shift_ratio",
        type=int,
        help="percent (0..100) of samples that are long (chosen > 100 words) or tagged; the rest are not",
    )
    parser.add_argument(
        "--image_only",
        action="store_true",
        help="drop multi-image and text-only items (counted in the report)",
    )
    parser.add_argument(
        "--skip_missing",
        action="store_true",
        help=f"skip lines with missing images or malformed content, listing them in {SKIPPED_FILENAME} "
        "(default: error naming file and line)",
    )
    parser.add_argument(
        "--allow_fewer", action="store_true", help="write fewer than --size samples when not enough pass"
    )
    parser.add_argument(
        "--image_folder",
        help="write image paths relative to this folder (the training --image_folder); default: absolute",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    """CLI entry point; returns the written paths."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.out_dir:
        if args.dpo_out or args.sft_out:
            parser.error("give either --out_dir or both --dpo_out and --sft_out, not both")
        dpo_out, sft_out = Path(args.out_dir) / DPO_FILENAME, Path(args.out_dir) / SFT_FILENAME
    elif args.dpo_out and args.sft_out:
        dpo_out, sft_out = Path(args.dpo_out), Path(args.sft_out)
    else:
        parser.error("give --out_dir, or both --dpo_out and --sft_out")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = MMPRConfig(
            meta_path=args.meta_path,
            size=args.size,
            seed=args.seed,
            token_limit=args.token_limit,
            tokenizer=args.tokenizer,
            filters=tuple(args.filters),
            shift_ratio=args.shift_ratio,
            image_only=args.image_only,
            skip_missing=args.skip_missing,
            allow_fewer=args.allow_fewer,
            image_folder=args.image_folder,
        )
        conversion = convert_mmpr(cfg)
    except ValueError as err:  # bad settings or input (RecordError, InsufficientSamplesError, meta.json)
        parser.exit(1, f"error: {err}\n")
    paths = write_conversion(conversion, dpo_out, sft_out)
    logger.info("%s", format_summary(conversion.report))
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return paths


if __name__ == "__main__":
    main()
