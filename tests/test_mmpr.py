"""Tests for the MMPR converter (`llava.data.mmpr`) on a small MMPR-v1.2-shaped fixture.

The fixture records, for every line it writes, the ground truth the converter must reproduce
(number of images, word count and tags of the chosen response, expected problems), so the tests
compare against facts fixed by construction rather than against the converter's own output.
"""

from __future__ import annotations

import json
import math
import pickle
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from PIL import Image

from llava.data.errors import RecordError
from llava.data.mmpr import (
    InsufficientSamplesError,
    MMPRConfig,
    MMPRInputError,
    convert_mmpr,
    main,
    read_meta,
    write_conversion,
)
from llava.data.mmpr_filters import has_reasoning_tags

VOCAB = [
    "triangle",
    "elephant",
    "velocity",
    "quantity",
    "diagram",
    "measure",
    "picture",
    "compute",
    "distance",
    "chemical",
    "reaction",
    "bicycle",
    "mountain",
    "yellowish",
    "rectangle",
    "orchestra",
]
# (chosen word count, reasoning tag or None), cycled over the lines of a dataset.
CHOSEN_SPECS = [
    (3, None),
    (29, None),
    (30, None),
    (45, None),
    (59, None),
    (60, None),
    (80, None),
    (100, None),
    (101, None),
    (150, None),
    (12, "think"),
    (40, "review"),
    (70, "REASONING"),
    (120, "answer"),
    (15, None),
    (20, None),
    (25, None),
]


@dataclass
class LineSpec:
    """What the fixture wrote on one valid line."""

    dataset: str
    line: int
    n_images: int
    question: str
    chosen: str
    words: int
    tagged: bool
    raw: dict


@dataclass
class Fixture:
    world: Path
    meta: Path
    meta_reversed: Path
    meta_dirty: Path
    specs: dict[str, LineSpec] = field(default_factory=dict)
    dirty: dict[str, str] = field(default_factory=dict)


def _words(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(VOCAB) for _ in range(n)]


def _chosen(rng: random.Random, n_words: int, tag: str | None) -> str:
    if tag is None:
        return " ".join(_words(rng, n_words))
    inner = _words(rng, n_words - 3)
    return " ".join([f"<{tag}>", *inner[:-1], f"</{tag}>", inner[-1] + ","]) + " final."


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (10, 200, 30)).save(path)


def _write_dataset(
    fx: Fixture, name: str, n_lines: int, kinds: dict[int, int], blank_after: int | None
) -> None:
    """Write ``n_lines`` valid lines; ``kinds`` maps line number to image count (default 1)."""
    rng = random.Random(name)
    lines: list[str] = []
    for i in range(1, n_lines + 1):
        n_images = kinds.get(i, 1)
        images = [f"{name}/{i}_{k}.png" for k in range(n_images)]
        for rel in images:
            _png(fx.world / "images" / rel)
        words, tag = CHOSEN_SPECS[(i + len(name)) % len(CHOSEN_SPECS)]
        chosen = _chosen(rng, words, tag)
        question = " ".join(_words(rng, 6)) + "?"
        if n_images and i % 4 == 0:
            question = "".join(f"Image-{k + 1}: <image>\n" for k in range(n_images)) + question
        raw: dict = {"question": question, "chosen": chosen, "rejected": " ".join(_words(rng, 7))}
        if n_images == 1:
            raw["image"] = images[0]
        elif n_images > 1:
            raw["image"] = images
        raw["box"] = [0, 1, 2, i]
        raw["answer_type"] = "free" if i % 2 else "choice"
        line_no = len(lines) + 1
        lines.append(json.dumps(raw))
        fx.specs[f"{name}/{line_no}"] = LineSpec(
            name, line_no, n_images, question, chosen, len(chosen.split()), tag is not None, raw
        )
        if blank_after == i:
            lines.append("")
    (fx.meta.parent / "annotations" / f"{name}.jsonl").write_text("\n".join(lines) + "\n")


def _write_dirty(fx: Fixture) -> None:
    """Dataset ``delta``: two valid lines around missing-image and malformed lines."""
    _png(fx.world / "images/delta/ok.png")
    ok = {"image": "delta/ok.png", "question": "q", "chosen": "a b", "rejected": "c"}
    bad = [
        (json.dumps(ok), None),
        (json.dumps({**ok, "image": "delta/gone.png"}), "missing_image"),
        (json.dumps({**ok, "image": ["delta/ok.png", "delta/gone2.png"]}), "missing_image"),
        ('{"image": "delta/ok.png", "question": "q", "chosen": "a"', "malformed"),
        (json.dumps({k: v for k, v in ok.items() if k != "rejected"}), "malformed"),
        (json.dumps({**ok, "chosen": "   "}), "malformed"),
        (json.dumps({**ok, "chosen": "see <image> here"}), "malformed"),
        (json.dumps({**ok, "question": "<image> vs <image>"}), "malformed"),
        (json.dumps({**ok, "image": []}), "malformed"),
        (json.dumps(ok), None),
    ]
    lines = [text for text, _ in bad]
    fx.dirty = {f"delta/{i}": kind for i, (_, kind) in enumerate(bad, start=1) if kind}
    (fx.meta.parent / "annotations/delta.jsonl").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def fx(tmp_path_factory: pytest.TempPathFactory) -> Fixture:
    world = tmp_path_factory.mktemp("world")
    mmpr = world / "mmpr"
    (mmpr / "annotations").mkdir(parents=True)
    fixture = Fixture(world, mmpr / "meta.json", mmpr / "meta_reversed.json", mmpr / "meta_dirty.json")
    _write_dataset(fixture, "alpha", 16, {}, None)
    _write_dataset(fixture, "beta", 14, {1: 2, 5: 2, 9: 3, 3: 0, 7: 0, 11: 0}, None)
    _write_dataset(fixture, "gamma", 10, {}, blank_after=5)
    _write_dirty(fixture)
    entries = {
        n: {"root": "../images", "annotation": f"annotations/{n}.jsonl"} for n in ("gamma", "alpha", "beta")
    }
    fixture.meta.write_text(json.dumps(entries))
    fixture.meta_reversed.write_text(json.dumps(dict(reversed(entries.items()))))
    fixture.meta_dirty.write_text(
        json.dumps({**entries, "delta": {"root": "../images", "annotation": "annotations/delta.jsonl"}})
    )
    return fixture


def _convert(fx: Fixture, meta: Path | None = None, **kwargs):
    """Convert the fixture; by default without the training-length check (it needs a chat tokenizer,
    tested below with the tiny one) and keeping multi-image items (``max_images`` is tested below)."""
    kwargs.setdefault("image_folder", str(fx.world))
    kwargs.setdefault("model_max_length", 0)
    kwargs.setdefault("max_images", 0)
    return convert_mmpr(MMPRConfig(meta_path=str(meta or fx.meta), **kwargs))


def _long_or_tagged(spec: LineSpec) -> bool:
    return spec.words > 100 or spec.tagged


def test_fixture_has_every_case(fx: Fixture) -> None:
    specs = list(fx.specs.values())
    assert len(specs) == 40
    assert sum(s.n_images > 1 for s in specs) == 3 and sum(s.n_images == 0 for s in specs) == 3
    assert sum(_long_or_tagged(s) for s in specs) >= 8 and sum(not _long_or_tagged(s) for s in specs) >= 10


@pytest.mark.parametrize(
    ("text", "tagged"),
    [
        ("<think> x </think>", True),
        ("a </Review>", True),
        ('<answer type="x">B', True),
        ("<image> x", False),
        ("thinking about <thinker>", False),
        ("plain", False),
        ("<reasoning>", True),
        ("< summary >", True),
    ],
)
def test_reasoning_tags(text: str, tagged: bool) -> None:
    assert has_reasoning_tags(text) is tagged


def test_sft_and_dpo_share_ids_order_and_content(fx: Fixture) -> None:
    conv = _convert(fx, size=25)
    assert len(conv.dpo) == len(conv.sft) == 25
    assert [r["id"] for r in conv.dpo] == [r["id"] for r in conv.sft]
    assert len({r["id"] for r in conv.dpo}) == 25
    for dpo, sft in zip(conv.dpo, conv.sft):
        assert sft["conversations"] == [
            {"from": "human", "value": dpo["prompt"]},
            {"from": "gpt", "value": dpo["chosen"]},
        ]
        assert sft.get("image") == dpo.get("image") and sft["meta"] == dpo["meta"]
        keys = ["id", "image", "prompt", "chosen", "rejected", "meta"]
        assert list(dpo) == [k for k in keys if k != "image" or "image" in dpo]


def test_records_match_source_lines(fx: Fixture) -> None:
    conv = _convert(fx, size=40)
    assert {r["id"] for r in conv.dpo} == set(fx.specs)
    for rec in conv.dpo:
        spec = fx.specs[rec["id"]]
        assert rec["chosen"] == spec.chosen and rec["rejected"] == spec.raw["rejected"]
        assert rec["meta"] == {
            "source_dataset": spec.dataset,
            "source_line": spec.line,
            "box": spec.raw["box"],
            "answer_type": spec.raw["answer_type"],
        }
        assert rec["prompt"].count("<image>") == spec.n_images
        if spec.n_images and "<image>" not in spec.question:
            assert rec["prompt"] == "<image>\n" * spec.n_images + spec.question
        else:
            assert rec["prompt"] == spec.question
        if spec.n_images == 0:
            assert "image" not in rec
        elif spec.n_images == 1:
            assert rec["image"] == "images/" + spec.raw["image"] and (fx.world / rec["image"]).is_file()
        else:
            assert rec["image"] == ["images/" + p for p in spec.raw["image"]]
    expected_added = sum(s.n_images > 0 and "<image>" not in s.question for s in fx.specs.values())
    assert conv.report["totals"]["image_token_added"] == expected_added


def test_image_paths_absolute_without_image_folder(fx: Fixture) -> None:
    conv = _convert(fx, size=40, image_folder=None)
    for rec in conv.sft:
        for path in [rec["image"]] if isinstance(rec.get("image"), str) else rec.get("image", []):
            assert Path(path).is_absolute() and Path(path).is_file()


def test_image_outside_image_folder_is_an_error(fx: Fixture) -> None:
    with pytest.raises(ValueError, match="outside --image_folder"):
        _convert(fx, size=5, image_folder=str(fx.world / "mmpr"))


def test_sampling_is_deterministic_and_independent_of_meta_order(fx: Fixture) -> None:
    first = _convert(fx, size=15, seed=777)
    again = _convert(fx, size=15, seed=777)
    reordered = _convert(fx, meta=fx.meta_reversed, size=15, seed=777)
    assert first.dpo == again.dpo == reordered.dpo and first.sft == reordered.sft


def test_different_seed_changes_the_sample(fx: Fixture) -> None:
    a = [r["id"] for r in _convert(fx, size=15, seed=777).dpo]
    b = [r["id"] for r in _convert(fx, size=15, seed=778).dpo]
    assert set(a) != set(b)


@pytest.mark.parametrize("filters", [(), ("under30",), ("nothink",), ("nothink", "under30")])
def test_filters_keep_exactly_the_expected_items(fx: Fixture, filters: tuple[str, ...]) -> None:
    def keep(spec: LineSpec) -> bool:
        under30 = spec.words < 30
        nothink = not spec.tagged and spec.words < 60
        return ("under30" not in filters or under30) and ("nothink" not in filters or nothink)

    conv = _convert(fx, size=1000, filters=filters, token_limit=0, allow_fewer=True)
    expected = {i for i, s in fx.specs.items() if keep(s)}
    assert {r["id"] for r in conv.dpo} == expected
    assert 0 < len(expected) < 40 or not filters
    for name in ("alpha", "beta", "gamma"):
        kept = conv.report["datasets"][name]["kept_after"]
        last = list(kept)[-1]
        assert last == (filters and ("nothink" if "nothink" in filters else "under30") or "valid")
        assert kept[last] == sum(s.dataset == name for i, s in fx.specs.items() if i in expected)


@pytest.mark.parametrize("ratio", [0, 50, 80])
def test_shift_ratio_proportions_are_exact(fx: Fixture, ratio: int) -> None:
    conv = _convert(fx, size=10, shift_ratio=ratio)
    ids = [r["id"] for r in conv.dpo]
    assert len(ids) == 10 and len(set(ids)) == 10
    assert sum(_long_or_tagged(fx.specs[i]) for i in ids) == ratio // 10
    assert conv.report["sampled"]["long_or_tagged"] == ratio // 10
    if ratio == 50:  # the two pools are shuffled together, not concatenated
        flags = [_long_or_tagged(fx.specs[i]) for i in ids]
        assert flags != sorted(flags, reverse=True)


def test_shift_ratio_short_pool_errors_or_allows_fewer(fx: Fixture) -> None:
    available = sum(_long_or_tagged(s) for s in fx.specs.values())
    with pytest.raises(InsufficientSamplesError, match="long_or_tagged"):
        _convert(fx, size=30, shift_ratio=100)
    conv = _convert(fx, size=30, shift_ratio=100, allow_fewer=True)
    assert len(conv.dpo) == available and all(_long_or_tagged(fx.specs[r["id"]]) for r in conv.dpo)


def test_too_few_items_error_unless_allowed(fx: Fixture) -> None:
    with pytest.raises(InsufficientSamplesError, match="allow_fewer"):
        _convert(fx, size=41)
    assert len(_convert(fx, size=41, allow_fewer=True).dpo) == 40


@pytest.fixture(scope="module")
def tokenizer_dir(fx: Fixture, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [f"{s.question} {s.chosen}" for s in fx.specs.values()] + ["<image>"]
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    path = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)
    return path


def _prompt(spec: LineSpec) -> str:
    if spec.n_images and "<image>" not in spec.question:
        return "<image>\n" * spec.n_images + spec.question
    return spec.question


def test_token_limit_uses_the_given_tokenizer(fx: Fixture, tokenizer_dir: Path) -> None:
    # The Whitespace pre-tokenizer splits on \w+|[^\w\s]+ and every piece is one WordLevel token.
    exact = {i: len(re.findall(r"\w+|[^\w\s]+", f"{_prompt(s)} {s.chosen}")) for i, s in fx.specs.items()}
    approx = {
        i: max(len(f"{_prompt(s)} {s.chosen}".split()), math.ceil(len(f"{_prompt(s)} {s.chosen}") / 4))
        for i, s in fx.specs.items()
    }
    limit = sorted(exact.values())[len(exact) // 2]
    conv = _convert(fx, size=1000, token_limit=limit, tokenizer=str(tokenizer_dir), allow_fewer=True)
    kept = {r["id"] for r in conv.dpo}
    assert kept == {i for i, n in exact.items() if n <= limit}
    assert conv.report["tokenizer"]["name"] == str(tokenizer_dir)
    assert conv.report["totals"]["token_over_limit"] == sum(n > limit for n in exact.values())
    assert conv.report["sampling"]["token_counts_complete"] is True

    fallback = _convert(fx, size=1000, token_limit=limit, allow_fewer=True)
    assert {r["id"] for r in fallback.dpo} == {i for i, n in approx.items() if n <= limit} != kept
    assert fallback.report["tokenizer"]["name"] == "approximation"

    partial = _convert(fx, size=5, token_limit=limit, tokenizer=str(tokenizer_dir))
    assert all(exact[r["id"]] <= limit for r in partial.dpo) and len(partial.dpo) == 5
    assert partial.report["totals"]["token_checked"] >= 5


def test_missing_and_malformed_lines_raise_by_default(fx: Fixture, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(MMPRInputError) as info:
        _convert(fx, meta=fx.meta_dirty, size=5)
    err = info.value
    assert {i.record_id: i.kind for i in err.issues} == fx.dirty
    assert "delta.jsonl:2" in str(err) and "delta.jsonl:4" in str(err) and "--skip_missing" in str(err)
    assert err.record_id == "delta/2" and err.path.endswith("delta.jsonl")
    assert isinstance(err, RecordError) and pickle.loads(pickle.dumps(err)).issues == err.issues
    with pytest.raises(SystemExit) as exit_info:
        main(
            ["--meta_path", str(fx.meta_dirty), "--out_dir", str(fx.world / "unused"), "--size", "5"]
            + ["--model_max_length", "0"]
        )
    assert exit_info.value.code == 1 and "delta.jsonl:9" in capsys.readouterr().err


def test_skip_missing_records_and_counts_skipped_lines(fx: Fixture, tmp_path: Path) -> None:
    conv = _convert(fx, meta=fx.meta_dirty, size=42, skip_missing=True)
    paths = write_conversion(conv, tmp_path / "dpo.json", tmp_path / "sft.json")
    skipped = [json.loads(line) for line in paths["skipped"].read_text().splitlines()]
    assert {s["id"]: s["kind"] for s in skipped} == fx.dirty and all(s["reason"] for s in skipped)
    assert {r["id"] for r in conv.dpo} == set(fx.specs) | {"delta/1", "delta/10"}
    delta = conv.report["datasets"]["delta"]
    assert delta["read"] == 10 and delta["sampled"] == 2
    assert delta["missing_image"] == sum(k == "missing_image" for k in fx.dirty.values())
    assert delta["malformed"] == sum(k == "malformed" for k in fx.dirty.values())


def test_image_only_drops_and_counts_multi_image_and_text_only(fx: Fixture) -> None:
    conv = _convert(fx, size=1000, image_only=True, allow_fewer=True)
    single = {i for i, s in fx.specs.items() if s.n_images == 1}
    assert {r["id"] for r in conv.dpo} == single
    beta = conv.report["datasets"]["beta"]
    assert (beta["multi_image"], beta["text_only"]) == (3, 3)
    assert beta["kept_after"] == {"valid": 14, "image_only": 8}
    default = _convert(fx, size=1000, image_only=True, allow_fewer=True, max_images=1)
    assert {r["id"] for r in default.dpo} == single
    assert default.report["datasets"]["beta"]["kept_after"] == {
        "valid": 14,
        "max_images": 11,
        "image_only": 8,
    }


def test_cli_writes_outputs_and_report(fx: Fixture, tmp_path: Path) -> None:
    out = tmp_path / "out"
    paths = main(
        [
            "--meta_path",
            str(fx.meta),
            "--out_dir",
            str(out),
            "--size",
            "12",
            "--seed",
            "5",
            "--filters",
            "nothink",
            "--image_folder",
            str(fx.world),
            "--model_max_length",
            "0",
            "--max_images",
            "0",
        ]
    )
    dpo = json.loads((out / "mmpr_dpo.json").read_text())
    sft = json.loads((out / "mmpr_sft.json").read_text())
    report = json.loads((out / "mmpr_report.json").read_text())
    assert paths["report"] == out / "mmpr_report.json" and "skipped" not in paths
    assert [r["id"] for r in dpo] == [r["id"] for r in sft] and len(dpo) == 12
    assert dpo == _convert(fx, size=12, seed=5, filters=("nothink",)).dpo
    for name in ("alpha", "beta", "gamma"):
        lines = (fx.meta.parent / f"annotations/{name}.jsonl").read_text().splitlines()
        assert report["datasets"][name]["read"] == sum(bool(line.strip()) for line in lines)
    assert report["datasets"]["gamma"]["blank_lines"] == 1
    assert report["sampled"]["total"] == report["totals"]["sampled"] == 12
    assert report["settings"]["seed"] == 5 and report["settings"]["filters"] == ["nothink"]
    assert report["tokenizer"]["name"] == "approximation"

    main(
        [
            "--meta_path",
            str(fx.meta),
            "--dpo_out",
            str(tmp_path / "a/d.json"),
            "--sft_out",
            str(tmp_path / "b/s.json"),
            "--size",
            "12",
            "--seed",
            "5",
            "--filters",
            "nothink",
            "--image_folder",
            str(fx.world),
            "--model_max_length",
            "0",
            "--max_images",
            "0",
        ]
    )
    assert (
        json.loads((tmp_path / "a/d.json").read_text()) == dpo and (tmp_path / "a/mmpr_report.json").is_file()
    )


@pytest.mark.parametrize("argv", [[], ["--dpo_out", "x.json"], ["--out_dir", "o", "--sft_out", "s.json"]])
def test_cli_requires_output_paths(fx: Fixture, argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--meta_path", str(fx.meta), *argv])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": 0}, "size"),
        ({"token_limit": -1}, "token_limit"),
        ({"filters": ("short",)}, "unknown filter"),
        ({"shift_ratio": 101}, "shift_ratio"),
        ({"image_folder": "/nonexistent"}, "image_folder"),
        ({"model_max_length": 2048}, "--tokenizer"),
        ({"model_max_length": -1}, "model_max_length"),
        ({"image_tokens": 0, "model_max_length": 0}, "image_tokens"),
        ({"max_images": -1, "model_max_length": 0}, "max_images"),
        ({"conv_template": "vicuna", "model_max_length": 0}, "conv_template"),
    ],
)
def test_config_fails_fast(fx: Fixture, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MMPRConfig(meta_path=str(fx.meta), **kwargs)


def test_meta_errors_name_the_problem(tmp_path: Path) -> None:
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"a": {"root": ".", "annotation": "missing.jsonl"}}))
    with pytest.raises(ValueError, match="missing.jsonl"):
        read_meta(meta)
    meta.write_text(json.dumps({"a": {"root": "."}}))
    with pytest.raises(ValueError, match="'a'"):
        read_meta(meta)
    meta.write_text('{"a": {"root": ".", "annotation": "x"}, "a": {"root": ".", "annotation": "y"}}')
    with pytest.raises(ValueError, match="duplicate"):
        read_meta(meta)


def test_training_tokenizer_gets_the_image_token(tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    from llava.data.mmpr_fit import load_training_tokenizer

    assert len(AutoTokenizer.from_pretrained(tokenizer_dir).encode("<image>", add_special_tokens=False)) > 1
    assert len(load_training_tokenizer(str(tokenizer_dir)).encode("<image>", add_special_tokens=False)) == 1
    with pytest.raises(ValueError, match="could not be loaded"):
        load_training_tokenizer(str(tokenizer_dir / "missing"))
