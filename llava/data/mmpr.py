"""MMPR-v1.2 converter: ``meta.json`` + annotation jsonl → DPO, SFT and GRPO jsons with shared ids.

Follows the Stage-2 data of Song et al. 2025 ("RL makes MLLMs see better than SFT", arXiv
2510.16333) and PIVOT's MMPR sampler (seed 777, 20K samples, token limit 1500 on prompt + chosen,
single-image items), with the record formats of DESIGN §3 / docs/CONTRACTS.md §3:

- DPO (LLaVA-NeXT): ``{"id", "image"?, "prompt", "chosen", "rejected", "meta"}``
- SFT (LLaVA): ``{"id", "image"?, "conversations": [human: prompt, gpt: chosen], "meta"}``
- GRPO (issue 16): ``{"id", "image"?, "prompt", "answer", "answer_format", "box"?, "meta"}`` for the
  sampled items whose ground truth can be derived (``llava.data.mmpr_answers``: multiple choice,
  numbers, short answers); the others are counted and listed by id and reason under ``grpo`` in the report.

Both files hold the same samples in the same order with the same ids, and every written record fits
training's ``model_max_length`` on both sides, so SFT and DPO train on identical data. Pipeline:

1. Read every dataset of ``meta.json`` (sorted by name; ``root`` and ``annotation`` may be relative
   to the meta file's directory) and every line of its annotation file (in file order).
2. Validate each line: malformed lines (bad JSON, missing/empty fields, ``<image>`` in a response,
   a placeholder count that does not match the images) and lines whose image files are missing are
   collected; they raise :class:`MMPRInputError` naming file and line, or with ``skip_missing`` are
   written to ``mmpr_skipped.jsonl`` with their reasons. Nothing is dropped silently.
3. Items with more than ``max_images`` images are excluded (default 1, as PIVOT's sampler drops
   multi-image files; 0 keeps any number). ``image_only`` keeps single-image items only. A prompt
   lacking ``<image>`` gets one ``"<image>\\n"`` per image prepended.
4. Apply the named filters (``llava.data.mmpr_filters.FILTERS``: under30, nothink).
5. Seeded sample: a ``random.Random(seed)`` permutation of the candidates is walked in order and
   the first ``size`` items that pass two length checks are taken (a uniform sample without
   replacement of the items passing every filter and check, in random order; checks run only as
   far as needed): PIVOT's token limit on the ``prompt + " " + chosen`` text, then the training-time
   check of ``llava.data.mmpr_fit`` (the records tokenised as training does, with the chat template,
   ``image_tokens`` visual tokens per image, both the chosen and the rejected side, within
   ``model_max_length``). With ``shift_ratio`` r the "long or tagged" and the other items are two
   pools sampled to round(size·r/100) and the rest, then shuffled together.

Every candidate excluded by ``max_images`` or a length check is listed with its reason under
``excluded`` in the report (``mmpr_report.json``); nothing is dropped silently.

Ids are ``"<dataset name>/<1-based line number>"``. ``meta`` holds the source dataset name and line
(``source_dataset``, ``source_line``) and every extra annotation key (e.g. ``box``, ``answer_type``).
Image paths are written relative to ``image_folder`` when given (the training ``--image_folder``),
else absolute. Usage: ``python -m llava.data.mmpr --meta_path MMPR/meta.json --out_dir data/
--tokenizer Qwen/Qwen2.5-1.5B-Instruct`` (the tokenizer of the LLM to be trained).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from llava.data.mmpr_answers import grpo_records
from llava.data.mmpr_filters import (
    FILTERS,
    REASONING_TAGS,
    TokenCounter,
    is_long_or_tagged,
    load_token_counter,
    token_limit_text,
)
from llava.data.mmpr_input import (
    SKIPPED_FILENAME,
    DatasetSource,
    Issue,
    MMPRInputError,
    MMPRItem,
    item_issue,
    parse_line,
    read_meta,
    to_dpo_record,
    to_sft_record,
)
from llava.data.templates import CHAT_TEMPLATES

logger = logging.getLogger(__name__)

DPO_FILENAME = "mmpr_dpo.json"
SFT_FILENAME = "mmpr_sft.json"
GRPO_FILENAME = "mmpr_grpo.json"
REPORT_FILENAME = "mmpr_report.json"
TOKEN_BATCH = 1024


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
    model_max_length: int = 2048
    image_tokens: int = 576
    max_images: int = 1
    conv_template: str = "qwen_1_5"

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
        if self.model_max_length < 0:
            raise ValueError(
                f"model_max_length must be >= 0 (0 disables the check), got {self.model_max_length}"
            )
        if self.model_max_length and self.tokenizer is None:
            raise ValueError(
                f"the training-length check (model_max_length {self.model_max_length}) needs the training "
                "tokenizer: pass --tokenizer (e.g. Qwen/Qwen2.5-1.5B-Instruct or a local directory), or "
                "--model_max_length 0 to write records without checking that they fit"
            )
        if self.image_tokens < 1:
            raise ValueError(f"image_tokens must be >= 1 (visual tokens per image), got {self.image_tokens}")
        if self.max_images < 0:
            raise ValueError(f"max_images must be >= 0 (0 keeps any number), got {self.max_images}")
        if self.conv_template not in CHAT_TEMPLATES:
            raise ValueError(
                f"unknown conv_template {self.conv_template!r}; choose from {sorted(CHAT_TEMPLATES)}"
            )


class InsufficientSamplesError(ValueError):
    """Fewer items pass the filters than ``size`` asks for (and ``allow_fewer`` is off)."""


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
    too_many_images: int = 0
    kept_after: dict[str, int] = field(default_factory=dict)
    token_checked: int = 0
    token_over_limit: int = 0
    too_long_for_training: int = 0
    sampled: int = 0
    sampled_long_or_tagged: int = 0


@dataclass
class MMPRConversion:
    """The converted records (same order, same ids), the skipped lines and the report (which lists
    the excluded candidates under ``excluded``)."""

    dpo: list[dict[str, Any]]
    sft: list[dict[str, Any]]
    skipped: list[Issue]
    report: dict[str, Any]
    grpo: list[dict[str, Any]] = field(default_factory=list)


class FitCheck(Protocol):
    """Why a candidate's records would not pass training's tokenisation (None: they would)."""

    def problem(self, dpo_record: dict[str, Any], sft_record: dict[str, Any], source: str) -> str | None: ...


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


def apply_filters(
    items: list[MMPRItem], cfg: MMPRConfig, stats: dict[str, DatasetStats], excluded: list[Issue]
) -> list[MMPRItem]:
    """Drop items by ``max_images``, ``image_only`` and the named filters, recording per-dataset
    survivors; items over ``max_images`` are also listed in ``excluded``."""
    stages: list[tuple[str, Callable[[MMPRItem], bool]]] = [("valid", lambda item: True)]
    if cfg.max_images:
        stages.append(("max_images", lambda item: len(item.images) <= cfg.max_images))
    if cfg.image_only:
        stages.append(("image_only", lambda item: item.kind == "single_image"))
    stages += [(name, lambda item, keep=FILTERS[name]: keep(item.chosen)) for name in cfg.filters]
    for stage, keep in stages:
        kept = [item for item in items if keep(item)]
        if stage == "max_images":
            for item in items:
                if not keep(item):
                    stats[item.dataset].too_many_images += 1
                    reason = f"{len(item.images)} images > --max_images {cfg.max_images}"
                    excluded.append(item_issue(item, "too_many_images", reason))
        items = kept
        for dataset_stats in stats.values():
            dataset_stats.kept_after[stage] = 0
        for item in items:
            stats[item.dataset].kept_after[stage] += 1
    return items


def shift_targets(size: int, ratio: int) -> tuple[int, int]:
    """(long-or-tagged, other) sample counts for ``ratio`` percent long-or-tagged (half rounds up)."""
    n_long = math.floor(size * ratio / 100 + 0.5)
    return n_long, size - n_long


@dataclass
class LengthChecks:
    """PIVOT's token limit (0: off) and the training-time check (None: off) applied in sampling order,
    counting into ``stats`` and listing every excluded item in ``excluded``."""

    token_limit: int
    counter: TokenCounter
    fit: FitCheck | None
    stats: dict[str, DatasetStats]
    excluded: list[Issue]

    def _problem(self, item: MMPRItem, n_tokens: int) -> Issue | None:
        if self.token_limit and n_tokens > self.token_limit:
            self.stats[item.dataset].token_over_limit += 1
            reason = f"{n_tokens} tokens of prompt + chosen text > --token_limit {self.token_limit}"
            return item_issue(item, "over_token_limit", reason)
        if self.fit is not None:
            reason = self.fit.problem(to_dpo_record(item), to_sft_record(item), item.annotation)
            if reason is not None:
                self.stats[item.dataset].too_long_for_training += 1
                return item_issue(item, "too_long_for_training", reason)
        return None

    def take(self, order: list[MMPRItem], target: int) -> tuple[list[MMPRItem], bool]:
        """The first ``target`` items of ``order`` passing both checks; also whether all were examined."""
        if not self.token_limit and self.fit is None:
            return order[:target], target >= len(order)
        taken: list[MMPRItem] = []
        examined = 0
        while len(taken) < target and examined < len(order):
            batch = order[examined : examined + TOKEN_BATCH]
            texts = [token_limit_text(item.prompt, item.chosen) for item in batch]
            counts = self.counter.count(texts) if self.token_limit else [0] * len(batch)
            for item, n_tokens in zip(batch, counts):
                examined += 1
                self.stats[item.dataset].token_checked += 1
                problem = self._problem(item, n_tokens)
                if problem is None:
                    taken.append(item)
                else:
                    self.excluded.append(problem)
                if len(taken) == target:
                    break
        return taken, examined == len(order)


def sample_items(
    items: list[MMPRItem], cfg: MMPRConfig, checks: LengthChecks
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
        taken, complete = checks.take(rng.sample(pool, len(pool)), target)
        facts["pools"][name] = {"available": len(pool), "target": target, "sampled": len(taken)}
        facts["token_counts_complete"] &= complete
        if len(taken) < target and not cfg.allow_fewer:
            raise InsufficientSamplesError(
                f"only {len(taken)} of the requested {target} samples ({name} pool) pass the filters, "
                f"the token limit {cfg.token_limit} and the training-length check (model_max_length "
                f"{cfg.model_max_length}, {cfg.image_tokens} tokens per image); {len(pool)} passed the "
                "filters. Lower --size or pass --allow_fewer"
            )
        selected += taken
    if cfg.shift_ratio is not None:
        rng.shuffle(selected)
    for item in selected:
        stats = checks.stats[item.dataset]
        stats.sampled += 1
        stats.sampled_long_or_tagged += int(is_long_or_tagged(item.chosen))
    return selected, facts


def load_fit_check(cfg: MMPRConfig) -> FitCheck | None:
    """The training-time check of ``cfg`` (None when ``model_max_length`` is 0)."""
    if not cfg.model_max_length:
        return None
    from llava.data.mmpr_fit import TrainingFitCheck, load_training_tokenizer

    assert cfg.tokenizer is not None  # MMPRConfig requires it with a model_max_length
    return TrainingFitCheck(
        load_training_tokenizer(cfg.tokenizer), cfg.conv_template, cfg.model_max_length, cfg.image_tokens
    )


def _totals(stats: dict[str, DatasetStats]) -> dict[str, Any]:
    """Sum of the per-dataset counters (``meta.json`` has at least one dataset)."""
    per_dataset = [asdict(s) for s in stats.values()]
    counters = [k for k, v in per_dataset[0].items() if type(v) is int]
    totals: dict[str, Any] = {k: sum(d[k] for d in per_dataset) for k in counters}
    totals["kept_after"] = {
        stage: sum(d["kept_after"][stage] for d in per_dataset) for stage in per_dataset[0]["kept_after"]
    }
    return totals


def _training_check(cfg: MMPRConfig) -> str:
    if not cfg.model_max_length:
        return "off (--model_max_length 0): records were not checked against training's length limit"
    return (
        f"every written record tokenises with template {cfg.conv_template!r}, {cfg.image_tokens} tokens per "
        f"image, within model_max_length {cfg.model_max_length} (prompt+chosen, prompt+rejected, SFT)"
    )


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
    excluded: list[Issue] = []
    candidates = apply_filters(items, cfg, stats, excluded)
    checks = LengthChecks(cfg.token_limit, counter, load_fit_check(cfg), stats, excluded)
    selected, facts = sample_items(candidates, cfg, checks)
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
        "training_check": _training_check(cfg),
        "excluded": [issue.to_json() for issue in excluded],
    }
    grpo, report["grpo"] = grpo_records(selected)
    return MMPRConversion(
        dpo=[to_dpo_record(item) for item in selected],
        sft=[to_sft_record(item) for item in selected],
        skipped=issues,
        report=report,
        grpo=grpo,
    )


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def write_conversion(conversion: MMPRConversion, dpo_out: str | Path, sft_out: str | Path) -> dict[str, Path]:
    """Write the DPO and SFT json, and next to the DPO json the GRPO json and the report (and skipped
    lines, if any run was allowed to skip). Returns the written paths; the report records them under
    ``outputs``."""
    dpo_out, sft_out = Path(dpo_out), Path(sft_out)
    paths = {"dpo": dpo_out, "sft": sft_out, "grpo": dpo_out.parent / GRPO_FILENAME}
    paths["report"] = dpo_out.parent / REPORT_FILENAME
    if conversion.report["settings"]["skip_missing"]:
        paths["skipped"] = dpo_out.parent / SKIPPED_FILENAME
    _write_json(dpo_out, conversion.dpo)
    _write_json(sft_out, conversion.sft)
    _write_json(paths["grpo"], conversion.grpo)
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
        f"image_only {settings['image_only']}, max_images {settings['max_images'] or 'any'}",
        f"training check: {report['training_check']}",
        f"{'dataset':<28}{'read':>8}{'malformed':>10}{'missing':>9}{'multi':>7}{'text':>7}{'>images':>8}"
        f"{'kept':>8}{'>limit':>8}{'too long':>9}{'sampled':>9}",
    ]
    rows = [*report["datasets"].items(), ("TOTAL", report["totals"])]
    for name, s in rows:
        kept = list(s["kept_after"].values())[-1] if s["kept_after"] else 0
        lines.append(
            f"{name:<28}{s['read']:>8}{s['malformed']:>10}{s['missing_image']:>9}{s['multi_image']:>7}"
            f"{s['text_only']:>7}{s['too_many_images']:>8}{kept:>8}{s['token_over_limit']:>8}"
            f"{s['too_long_for_training']:>9}{s['sampled']:>9}"
        )
    sampled = report["sampled"]
    lines.append(
        f"sampled {sampled['total']}: {sampled['single_image']} single-image, {sampled['multi_image']} "
        f"multi-image, {sampled['text_only']} text-only, {sampled['long_or_tagged']} long or tagged"
    )
    grpo = report["grpo"]
    lines.append(f"GRPO: {grpo['written']} with an answer {grpo['by_format']}, {grpo['no_answer']} without")
    if report["excluded"]:
        lines.append(f"{len(report['excluded'])} excluded candidates, each with its reason, under 'excluded'")
    if not report["sampling"]["token_counts_complete"]:
        lines.append("length checks cover only the items examined in sampling order")
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
        help="the training LLM's tokenizer (path or hub id, e.g. Qwen/Qwen2.5-1.5B-Instruct), for the token "
        "limit and the training-length check; required unless --model_max_length 0 (then the token limit "
        "approximates tokens as max(words, ceil(chars / 4)) and the report says so)",
    )
    parser.add_argument(
        "--model_max_length",
        type=int,
        default=2048,
        help="training's --model_max_length (scripts: 2048): only candidates whose DPO record (both sides) "
        "and SFT record tokenise within it, as training tokenises them, are sampled; 0 disables the check",
    )
    parser.add_argument(
        "--image_tokens",
        type=int,
        default=576,
        help="visual tokens per image at training time (paper, square: one 384² SigLIP image → 576; the tiny "
        "demo: (image_size / 8)²); for anyres models pass an upper bound",
    )
    parser.add_argument(
        "--max_images",
        type=int,
        default=1,
        help="exclude items with more images (default 1: single-image and text-only items, as PIVOT's "
        "sampler drops multi-image files); 0 keeps any number",
    )
    parser.add_argument(
        "--conv_template",
        default="qwen_1_5",
        choices=sorted(CHAT_TEMPLATES),
        help="training's --conv_template, used by the training-length check (Stage 2: qwen_1_5)",
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
        help="drop text-only (and multi-image) items, counted in the report",
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
            model_max_length=args.model_max_length,
            image_tokens=args.image_tokens,
            max_images=args.max_images,
            conv_template=args.conv_template,
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
