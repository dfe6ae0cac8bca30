"""Seeds, paired differences and claim-by-claim verdicts for the report (analysis/report.py).

The paper (Song et al. 2025) claims that DPO-trained encoders beat SFT-trained ones on five kinds of
measure: linear probes (Fig. 6), segmentation probes (Fig. 8), Grad-CAM localisation (Fig. 7),
vision-centric VQA (Figs. 2–5) and vision–language alignment (Fig. 10). A miniature run trains SFT
and DPO from one Stage-1 checkpoint with several seeds (scripts/demo.sh); this module turns the
results rows into, per measure,

- one value per (condition, pair key): the mean over the row's repeats (e.g. probe seeds). The
  condition is the row's ``run`` (alignment: ``vision``; Grad-CAM: ``loss_type``), the pair key its
  training seed ``train_seed`` (Grad-CAM, which trains from the Stage-1 checkpoint itself: the
  sample ``id``). A condition measured once without a pair key (e.g. the Stage-1 model, shared by
  every seed) pairs with every key of the other condition;
- mean ± std (ddof 1) over pair keys per condition, and paired differences ``a − b`` over the keys
  both have: DPO − SFT (the effect) and the controls next to it, sign-flipped DPO − DPO, frozen-
  encoder DPO − DPO, and Stage 1 − original tower; where a GRPO run exists, GRPO − SFT too (the
  paper's appendix B, Table C: GRPO beats SFT on the benchmarks, ImageNet and segmentation), with a
  verdict of its own by the same rule;
- a verdict for the claim's primary measure, computed from the paired DPO − SFT differences with a
  paired t-test (two-sided, 95 %) whose noise cannot be zero by construction: the noise σ is the
  paired std, floored (for pairs by training seed) by the seed-to-seed std of the SFT and DPO runs
  themselves and by the standard error of their repeats (e.g. probe seeds), so two seeds that happen
  to give equal differences, or runs whose spread the pairing hides, do not read as a resolved
  effect. *Resolved* when ``|mean| > t(0.975, n−1)·σ/√n``, then "reproduces" (DPO > SFT, the paper's
  direction) or "does not reproduce" (SFT > DPO); otherwise "cannot tell": fewer than 2 pairs, no
  noise estimate at all (σ = 0: every run and repeat gave one number), or within the noise. With 2
  seeds the bar is 12.7 σ/√2 ≈ 9 σ: only a large and consistent difference is resolved. Grad-CAM pairs
  by sample (one deterministic run per loss from the same checkpoint): its σ is the paired std over
  samples, with σ = 0 still "cannot tell".
  Every measure here is higher-is-better for the paper's claim.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

EFFECT: tuple[str, str] = ("dpo", "sft")
EFFECTS: tuple[tuple[str, str], ...] = (EFFECT, ("grpo", "sft"))
"""Differences with a verdict per claim: DPO − SFT always, GRPO − SFT where GRPO was measured."""
CONTROLS: tuple[tuple[str, str, str], ...] = (
    ("dpo_flipped", "dpo", "sign-flipped DPO − DPO"),
    ("dpo_frozen", "dpo", "frozen-encoder DPO − DPO"),
    ("stage1", "original", "Stage 1 − original tower"),
)
"""Control differences shown next to the effect: (condition a, condition b, label of a − b)."""
MIN_PAIRS = 2
CONFIDENCE = 0.95
METHOD_NOTE = (
    "Each measure is averaged over its repeats (e.g. probe seeds) per training seed, then shown as mean ± std "
    "over training seeds (Grad-CAM: over samples). DPO − SFT is paired by seed (sample); the controls beside it "
    "show what a broken or absent effect looks like. Verdict: a two-sided paired t-test of DPO − SFT (and of "
    f"GRPO − SFT, appendix B) at {CONFIDENCE:.0%}: *reproduces* / *does not reproduce* when |mean| > t·σ/√n, "
    "else *cannot tell*; σ is the paired std floored by the two runs' own seed-to-seed std and their repeats' "
    "standard error (so it is never zero by construction; σ = 0, i.e. no noise estimate at all, is *cannot tell*)."
)
CONDITION_ORDER: tuple[str, ...] = ("original", "stage1", "sft", "dpo", "grpo", "dpo_frozen", "dpo_flipped")


@dataclass(frozen=True)
class Measure:
    """One number per results row of a kind: which rows, which value, who is compared with whom."""

    name: str
    kind: str
    claim: str
    value: Callable[[dict[str, Any]], float | None]
    select: Callable[[dict[str, Any]], bool] = lambda row: True
    condition_key: str = "run"
    pair_key: str = "train_seed"
    primary: bool = False
    last_step_only: bool = False


def _scaled(key: str, scale: float) -> Callable[[dict[str, Any]], float | None]:
    def value(row: dict[str, Any]) -> float | None:
        raw = row.get(key)
        return None if raw is None else float(raw) * scale

    return value


def _where(**wanted: Any) -> Callable[[dict[str, Any]], bool]:
    return lambda row: all(row.get(k) == v for k, v in wanted.items())


CLAIMS: tuple[str, ...] = (
    "encoder probes",
    "segmentation",
    "Grad-CAM localisation",
    "vision-centric VQA",
    "alignment",
)
MEASURES: tuple[Measure, ...] = (
    Measure(
        "linear probe top-1 (%), encoder",
        "linear_probe",
        "encoder probes",
        _scaled("top1", 100),
        lambda r: (
            r.get("feature_point") == "encoder" and r.get("method") == "logreg" and r.get("layer") is None
        ),
        primary=True,
    ),
    Measure(
        "linear probe top-1 (%), encoder + projector",
        "linear_probe",
        "encoder probes",
        _scaled("top1", 100),
        lambda r: (
            r.get("feature_point") == "projector" and r.get("method") == "logreg" and r.get("layer") is None
        ),
    ),
    Measure(
        "seg-probe macro recall (%)",
        "seg_probe",
        "segmentation",
        _scaled("recall", 100),
        lambda r: r.get("feature_point", "encoder") == "encoder",
        primary=True,
    ),
    Measure(
        "Grad-CAM mass in box (last step)",
        "gradcam",
        "Grad-CAM localisation",
        _scaled("mass_in_box", 1),
        condition_key="loss_type",
        pair_key="id",
        primary=True,
        last_step_only=True,
    ),
    *(
        Measure(
            f"world VQA {column}",
            "benchmarks",
            "vision-centric VQA",
            _scaled(column, 1),
            primary=column == "Vision-centric",
        )
        for column in ("Vision-centric", "General", "Knowledge", "OCR & Chart", "Average")
    ),
    Measure(
        "alignment (max over layer pairs)",
        "alignment",
        "alignment",
        _scaled("score", 1),
        condition_key="vision",
        primary=True,
    ),
)


@dataclass
class Stat:
    """Mean ± std (ddof 1; None for n < 2) of values, and the values themselves."""

    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))

    @property
    def std(self) -> float | None:
        return float(np.std(self.values, ddof=1)) if self.n > 1 else None

    def text(self, digits: int = 2) -> str:
        if not self.values:
            return "–"
        spread = f" ± {self.std:.{digits}f}" if self.std is not None else ""
        return f"{self.mean:.{digits}f}{spread} (n={self.n})"


@dataclass
class MeasureResult:
    """Per-condition values by pair key, their stats, and the paired differences."""

    measure: Measure
    by_condition: dict[str, dict[Any, float]]
    repeats: dict[str, dict[Any, list[float]]] = field(default_factory=dict)
    conditions: dict[str, Stat] = field(default_factory=dict)
    differences: dict[str, Stat] = field(default_factory=dict)

    @property
    def effect(self) -> Stat:
        return self.differences[_label(*EFFECT)]


def _label(a: str, b: str) -> str:
    losses = {loss for effect in EFFECTS for loss in effect}
    return f"{a.upper() if a in losses else a} − {b.upper() if b in losses else b}"


def paired(values_a: Mapping[Any, float], values_b: Mapping[Any, float]) -> Stat:
    """Differences a − b over the shared pair keys; a side measured once without a key pairs with all."""
    if set(values_a) == {None} and set(values_b) != {None}:
        values_a = {key: values_a[None] for key in values_b}
    if set(values_b) == {None} and set(values_a) != {None}:
        values_b = {key: values_b[None] for key in values_a}
    shared = [key for key in values_a if key in values_b]
    return Stat([values_a[key] - values_b[key] for key in shared])


def measure_repeats(measure: Measure, rows: Sequence[dict[str, Any]]) -> dict[str, dict[Any, list[float]]]:
    """condition → pair key → the selected rows' values (the repeats, e.g. probe seeds, of one run)."""
    chosen = [r for r in rows if measure.select(r) and r.get(measure.condition_key) is not None]
    if measure.last_step_only and chosen:
        last = max(float(r.get("step") or 0) for r in chosen)
        chosen = [r for r in chosen if float(r.get("step") or 0) == last]
    collected: dict[str, dict[Any, list[float]]] = {}
    for row in chosen:
        value = measure.value(row)
        if value is None or not math.isfinite(value):
            continue
        condition = (
            str(row[measure.condition_key]).lower()
            if measure.kind == "gradcam"
            else str(row[measure.condition_key])
        )
        collected.setdefault(condition, {}).setdefault(row.get(measure.pair_key), []).append(value)
    return collected


def evaluate(measure: Measure, rows: Sequence[dict[str, Any]]) -> MeasureResult:
    """Stats per condition and the effect and control differences of one measure."""
    repeats = measure_repeats(measure, rows)
    by_condition = {c: {k: float(np.mean(v)) for k, v in keys.items()} for c, keys in repeats.items()}
    result = MeasureResult(measure, by_condition, repeats)
    order = [c for c in CONDITION_ORDER if c in by_condition] + sorted(
        set(by_condition) - set(CONDITION_ORDER)
    )
    result.conditions = {c: Stat(list(by_condition[c].values())) for c in order}
    for a, b, label in (*((*effect, _label(*effect)) for effect in EFFECTS), *CONTROLS):
        if a in by_condition and b in by_condition:
            result.differences[label] = paired(by_condition[a], by_condition[b])
    result.differences.setdefault(_label(*EFFECT), Stat([]))
    return result


def noise_floor(result: MeasureResult, conditions: tuple[str, str] = EFFECT) -> float:
    """The least noise a paired difference a − b of seed-paired runs (`conditions`) is credited with.

    The larger of (a) the seed-to-seed std of the a and of the b runs (a paired difference is taken
    to be no less noisy than the runs it subtracts: pairing that hides the spread is not trusted with
    two or three seeds) and (b) the standard error of one difference from the runs' repeats,
    √(mean SE²(a) + mean SE²(b)) with SE = std/√r over r repeats. Zero for sample-paired measures
    (Grad-CAM: there the samples' paired spread is the noise) and when nothing varies.
    """
    if result.measure.pair_key != "train_seed":
        return 0.0
    spreads = [result.conditions[c].std or 0.0 for c in conditions if c in result.conditions]
    squared_errors = [
        float(np.mean([np.var(v, ddof=1) / len(v) if len(v) > 1 else 0.0 for v in keys.values()]))
        for c in conditions
        if (keys := result.repeats.get(c))
    ]
    return max([*spreads, math.sqrt(sum(squared_errors))])


def verdict(effect: Stat, floor: float = 0.0, digits: int = 2, label: str = _label(*EFFECT)) -> str:
    """The claim's verdict from the paired differences ``label`` (DPO − SFT) and the noise floor
    (module docstring)."""
    if effect.n < MIN_PAIRS:
        return f"cannot tell: {effect.n} paired seed(s), need {MIN_PAIRS}"
    shown = f"{label} = {effect.text(digits)}"
    sigma = max(effect.std or 0.0, floor)
    if sigma == 0:
        return f"cannot tell: {shown} has no noise estimate (every run and repeat gave one value)"
    bar = t_critical(effect.n) * sigma / math.sqrt(effect.n)
    noise = f"σ = {sigma:.{digits}f}, abs(mean) > {bar:.{digits}f}"
    if not abs(effect.mean) > bar:
        return f"cannot tell: {shown} is within seed noise ({noise} needed)"
    if effect.mean > 0:
        return f"reproduces: {shown} ({noise})"
    return f"does not reproduce: {shown}, SFT higher ({noise})"


def t_critical(n: int) -> float:
    """Two-sided Student-t critical value at ``CONFIDENCE`` for the mean of ``n`` paired differences."""
    from scipy.stats import t

    return float(t.ppf(0.5 + CONFIDENCE / 2, n - 1))


def evaluate_all(rows_by_kind: Mapping[str, Sequence[dict[str, Any]]]) -> list[MeasureResult]:
    """Every measure whose kind has rows naming the effect's conditions or any condition at all."""
    results = []
    for measure in MEASURES:
        result = evaluate(measure, rows_by_kind.get(measure.kind, ()))
        if result.conditions:
            results.append(result)
    return results


def _md(headers: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body]) + "\n"


def _digits(measure: Measure) -> int:
    return 3 if measure.kind in ("alignment", "gradcam") else 2


def seed_table(results: Sequence[MeasureResult]) -> str:
    """Markdown: conditions and paired differences (rows) × measures of one kind (columns)."""
    if not results:
        return ""
    digits = _digits(results[0].measure)
    conditions = list(dict.fromkeys(c for r in results for c in r.conditions))
    differences = list(dict.fromkeys(d for r in results for d in r.differences))
    body = [
        [f"`{c}`", *(r.conditions[c].text(digits) if c in r.conditions else "–" for r in results)]
        for c in conditions
    ]
    body += [
        [
            f"**{d}** (paired)",
            *(r.differences[d].text(digits) if d in r.differences else "–" for r in results),
        ]
        for d in differences
    ]
    pair_keys = sorted({r.measure.pair_key for r in results})
    note = (
        f"Mean ± std over {' / '.join(pair_keys)} (n = how many); repeats within one (e.g. probe seeds) "
        "are averaged first. Differences are paired by the same key."
    )
    return note + "\n\n" + _md(["condition", *(r.measure.name for r in results)], body)


def claims_table(results: Sequence[MeasureResult]) -> str:
    """Markdown: claim by claim, the primary measure's effect, the controls and the verdict; when GRPO was
    measured (in any result), a second row ``<claim> (GRPO)`` with GRPO − SFT."""
    body = []
    measured = [(a, b) for a, b in EFFECTS[1:] if any(a in r.conditions for r in results)]
    for claim in CLAIMS:
        primary = next((r for r in results if r.measure.claim == claim and r.measure.primary), None)
        if primary is None:
            body.append([claim, "–", "–", "–", "cannot tell: not measured in this run"])
            continue
        digits = _digits(primary.measure)
        controls = "; ".join(
            f"{label}: {primary.differences[label].text(digits)}"
            for _, _, label in CONTROLS
            if label in primary.differences
        )
        effect = primary.effect
        body.append(
            [
                claim,
                primary.measure.name,
                effect.text(digits),
                controls or "–",
                verdict(effect, noise_floor(primary), digits),
            ]
        )
        for a, b in measured:
            label = _label(a, b)
            other = primary.differences.get(label, Stat([]))
            row = [f"{claim} ({a.upper()})", primary.measure.name, other.text(digits)]
            body.append([*row, "–", verdict(other, noise_floor(primary, (a, b)), digits, label)])
    headers = ["claim (paper: DPO > SFT; appendix B: GRPO > SFT)", "measure", "DPO (GRPO) − SFT (paired)"]
    return _md([*headers, "controls", "verdict"], body)
