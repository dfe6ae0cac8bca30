"""Segmentation probe: union patch labels, patch metrics, head training and the end-to-end CLI."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from analysis.seg_labels import (
    PatchCounts,
    load_mask,
    pack_labels,
    patch_metrics,
    union_patch_labels,
    unpack_labels,
)
from analysis.seg_probe import (
    SegProbeConfig,
    ade20k_split,
    evaluate_seg_head,
    main,
    patchseg_lr,
    train_seg_head,
    training_subset,
)

NUM_CLASSES = 6
COLOURS = {1: (220, 40, 40), 2: (40, 200, 60), 3: (40, 60, 220), 4: (230, 200, 30), 5: (200, 40, 200)}


def test_union_labels_on_hand_made_mask() -> None:
    mask = np.array(
        [
            [0, 0, 0, 3],
            [0, 0, 0, 0],
            [1, 2, 2, 2],
            [1, 1, 2, 5],
        ]
    )
    labels = union_patch_labels(mask, grid=(2, 2), num_classes=NUM_CLASSES)
    expected = np.zeros((4, NUM_CLASSES), dtype=bool)
    expected[0, 0] = True  # only unlabeled pixels: class 0 stays
    expected[1, 3] = True  # 0 + 3: class 0 cleared
    expected[2, [1, 2]] = True  # two classes, no 0
    expected[3, [2, 5]] = True  # class 5 from a single pixel
    np.testing.assert_array_equal(labels, expected)


def test_union_labels_batched_equals_per_image_and_rejects_bad_input() -> None:
    rng = np.random.default_rng(0)
    masks = rng.integers(0, NUM_CLASSES, size=(3, 8, 12))
    batched = union_patch_labels(masks, (2, 3), NUM_CLASSES)
    for i in range(3):
        np.testing.assert_array_equal(batched[i], union_patch_labels(masks[i], (2, 3), NUM_CLASSES))
    # independent check of one patch: pixels rows 4-7, cols 4-7 → patch (1, 1) = index 4
    present = set(np.unique(masks[1, 4:8, 4:8]).tolist())
    if present != {0}:
        present.discard(0)
    assert set(np.flatnonzero(batched[1, 4]).tolist()) == present
    np.testing.assert_array_equal(unpack_labels(pack_labels(batched), NUM_CLASSES), batched)
    with pytest.raises(ValueError, match="patch grid"):
        union_patch_labels(masks, (3, 3), NUM_CLASSES)
    with pytest.raises(ValueError, match="mask values"):
        union_patch_labels(masks + 1, (2, 3), NUM_CLASSES)


def test_patch_metrics_on_hand_made_confusion() -> None:
    target = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 0]], dtype=bool)
    predicted = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0]], dtype=bool)
    counts = PatchCounts.zeros(3)
    counts.update(predicted[:2], target[:2])
    counts.update(predicted[2:], target[2:])
    metrics = patch_metrics(counts)
    # class 0: 2 positives, 1 found, 2 predicted; class 1: 2 positives, 2 found, 2 predicted;
    # class 2: no positive patch → excluded from the macro averages.
    assert metrics["recall"] == pytest.approx((1 / 2 + 2 / 2) / 2)
    assert metrics["precision"] == pytest.approx((1 / 2 + 2 / 2) / 2)
    assert metrics["f1"] == pytest.approx((2 * 0.5 * 0.5 / 1.0 + 1.0) / 2)
    assert metrics["micro_accuracy"] == pytest.approx(9 / 12)
    assert metrics["n_classes_evaluated"] == 2
    assert metrics["precision_predicted"] == pytest.approx(metrics["precision"])  # both classes predicted


def test_never_predicted_class_counts_zero_precision_and_patchseg_skips_it() -> None:
    # class 0: 2 positives, 1 found, 1 predicted; class 1: 1 positive, never predicted (patch-seg: 0/0 = NaN).
    target = np.array([[1, 0], [1, 1], [0, 0]], dtype=bool)
    predicted = np.array([[1, 0], [0, 0], [0, 0]], dtype=bool)
    counts = PatchCounts.zeros(2)
    counts.update(predicted, target)
    metrics = patch_metrics(counts)
    assert metrics["precision"] == pytest.approx((1.0 + 0.0) / 2)
    assert metrics["precision_predicted"] == pytest.approx(1.0)
    counts = PatchCounts.zeros(2)
    counts.update(np.zeros_like(target), target)
    assert math.isnan(patch_metrics(counts)["precision_predicted"])


def _timm_cosine_scheduler():
    """timm's CosineLRScheduler loaded on its own: `import timm` needs torchvision, which pivot never installs."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("timm (installed with lmms-eval) is not available")
    folder = Path(next(iter(spec.submodule_search_locations))) / "scheduler"
    package = types.ModuleType("_timm_scheduler")
    package.__path__ = [str(folder)]
    sys.modules["_timm_scheduler"] = package
    try:
        for name in ("scheduler", "cosine_lr"):
            sub = importlib.util.spec_from_file_location(f"_timm_scheduler.{name}", folder / f"{name}.py")
            module = importlib.util.module_from_spec(sub)
            sys.modules[sub.name] = module
            sub.loader.exec_module(module)
        return module.CosineLRScheduler
    finally:
        for name in [n for n in sys.modules if n.startswith("_timm_scheduler")]:
            del sys.modules[name]


@pytest.mark.parametrize(("total", "warmup"), [(3160, 500), (1200, 500), (300, 500), (40, 0)])
def test_lr_schedule_equals_patchseg_timm_cosine(total: int, warmup: int) -> None:
    # patch-seg: CosineLRScheduler(t_initial=all steps, lr_min=1e-4, warmup_t=500, t_in_epochs=False),
    # step_update(num_updates) after each optimizer step. Our trainer's LambdaLR must give the same LRs.
    scheduler_cls = _timm_cosine_scheduler()
    lr, min_lr = 1e-3, 1e-4
    timm_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    timm_sched = scheduler_cls(timm_opt, t_initial=total, lr_min=min_lr, warmup_t=warmup, t_in_epochs=False)
    ours_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    ours = torch.optim.lr_scheduler.LambdaLR(
        ours_opt, lambda step: patchseg_lr(step, total, lr, min_lr, warmup) / lr
    )
    for step in range(total + 5):
        assert ours_opt.param_groups[0]["lr"] == pytest.approx(
            timm_opt.param_groups[0]["lr"], rel=1e-9, abs=1e-15
        )
        timm_opt.step(), ours_opt.step()
        timm_sched.step_update(num_updates=step + 1)
        ours.step()


def test_lr_schedule_has_no_restart_after_warmup() -> None:
    # At the midpoint of an ADE20K-sized run the cosine counts the warmup's steps too (5.5e-4, not 6.8e-4).
    assert patchseg_lr(0, 3160, 1e-3, 1e-4, 500) == 0.0
    assert patchseg_lr(1580, 3160, 1e-3, 1e-4, 500) == pytest.approx(5.5e-4)


def _scene(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A flat grey background (class 0) with a rectangle and a disc of random classes."""
    mask = np.zeros((height, width), dtype=np.uint8)
    yy, xx = np.mgrid[:height, :width]
    classes = rng.choice(np.arange(1, NUM_CLASSES), size=2, replace=False)
    top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
    mask[top : top + rng.integers(8, height // 2 + 4), left : left + rng.integers(8, width // 2 + 4)] = (
        classes[0]
    )
    cy, cx, radius = rng.integers(8, height - 8), rng.integers(8, width - 8), rng.integers(5, 9)
    mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = classes[1]
    image = np.full((height, width, 3), 128, dtype=np.uint8)
    for label, colour in COLOURS.items():
        image[mask == label] = colour
    return image, mask


def make_ade_layout(root: Path, n_train: int, n_val: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split, count in (("training", n_train), ("validation", n_val)):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(count):
            image, mask = _scene(rng, 36, 44)  # not square: exercises the centre crop
            Image.fromarray(image).save(root / "images" / split / f"ADE_{split}_{i:04d}.jpg", quality=95)
            Image.fromarray(mask).save(root / "annotations" / split / f"ADE_{split}_{i:04d}.png")
    return root


@pytest.fixture(scope="module")
def ade_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_ade_layout(tmp_path_factory.mktemp("ade"), n_train=40, n_val=12)


def test_ade20k_split_pairs_files_and_names_unpaired_ones(tmp_path: Path) -> None:
    root = make_ade_layout(tmp_path / "ade", n_train=3, n_val=1)
    images, annotations = ade20k_split(root, "training")
    assert (
        [p.stem for p in images]
        == [p.stem for p in annotations]
        == [f"ADE_training_{i:04d}" for i in range(3)]
    )
    (root / "images" / "training" / "ADE_training_0001.jpg").unlink()
    with pytest.raises(ValueError, match="ADE_training_0001"):
        ade20k_split(root, "training")


def test_head_reaches_high_recall_on_features_that_encode_the_class(ade_root: Path) -> None:
    size, grid = (16, 16), (4, 4)

    def split_labels(split: str) -> np.ndarray:
        paths = sorted((ade_root / "annotations" / split).glob("*.png"))
        masks = np.stack([load_mask(p, size, NUM_CLASSES) for p in paths])
        return union_patch_labels(masks, grid, NUM_CLASSES)

    train_labels, val_labels = split_labels("training"), split_labels("validation")
    # perfect features: the patch's own multi-hot class indicator
    train_tokens, val_tokens = train_labels.astype(np.float32), val_labels.astype(np.float32)
    # protocol head and optimiser; more epochs than 5 and a shorter warmup than 500: 40 images make 10 steps an epoch
    config = SegProbeConfig(num_classes=NUM_CLASSES, batch_size=4, epochs=12, warmup_steps=20, device="cpu")
    head, epoch_recall = train_seg_head(
        train_tokens, pack_labels(train_labels), config, seed=0, eval_set=(val_tokens, val_labels)
    )
    metrics = evaluate_seg_head(head, val_tokens, pack_labels(val_labels), config)
    assert metrics["recall"] > 0.9
    assert len(epoch_recall) == config.epochs and epoch_recall[-1] == pytest.approx(metrics["recall"])
    # the same head on shuffled features cannot do this: the check can fail
    shuffled = val_tokens[:, np.random.default_rng(0).permutation(val_tokens.shape[1])]
    assert evaluate_seg_head(head, shuffled, val_labels, config)["recall"] < metrics["recall"]


def test_training_subset_is_seeded_sorted_and_the_same_for_every_call(ade_root: Path) -> None:
    images, annotations = ade20k_split(ade_root, "training")
    subset = training_subset(images, annotations, 10)
    assert subset == training_subset(images, annotations, 10)
    assert len(subset[0]) == 10 and subset[0] == sorted(subset[0])
    assert [p.stem for p in subset[0]] == [p.stem for p in subset[1]]  # images stay paired with masks
    assert training_subset(images, annotations, len(images) + 5) == (images, annotations)
    with pytest.raises(ValueError, match="max_train_images"):
        SegProbeConfig(max_train_images=0)


def _tiny_siglip(path: Path) -> Path:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=16,
        patch_size=4,
    )
    transformers.SiglipVisionModel(config).save_pretrained(path)
    transformers.SiglipImageProcessorPil(size={"height": 16, "width": 16}).save_pretrained(path)
    return path


@pytest.mark.slow
def test_seg_probe_cli_end_to_end(ade_root: Path, tmp_path: Path) -> None:
    encoder = _tiny_siglip(tmp_path / "tiny-siglip")
    out, pngs = tmp_path / "seg.json", tmp_path / "png"
    argv = [
        "--encoders", str(encoder), "--data", str(ade_root), "--out", str(out), "--png-dir", str(pngs),
        "--table", str(tmp_path / "seg.md"), "--seeds", "2", "--epochs", "2", "--batch-size", "8",
        "--num-classes", str(NUM_CLASSES), "--n-qualitative", "3", "--cache-dir", str(tmp_path / "cache"),
        "--device", "cpu", "--first_seed", "3", "--max_train_images", "30",
    ]  # fmt: skip
    main(argv)
    results = json.loads(out.read_text())
    assert results["kind"] == "seg_probe"
    assert [row["seed"] for row in results["rows"]] == [3, 4]
    for row in results["rows"]:
        assert row["run"] == "tiny-siglip" and row["n_eval"] == 12 and row["grid"] == [4, 4]
        assert row["n_train"] == 30
        assert all(0.0 <= row[m] <= 1.0 for m in ("recall", "micro_accuracy", "precision", "f1"))
    summary = results["summary"]["tiny-siglip"]
    recalls = [row["recall"] for row in results["rows"]]
    assert summary["recall"]["mean"] == pytest.approx(np.mean(recalls))
    assert summary["recall"]["std"] == pytest.approx(np.std(recalls, ddof=1))
    panels = sorted((pngs / "tiny-siglip").glob("*.png"))
    assert len(panels) == 3
    with Image.open(panels[0]) as panel:
        assert panel.size == (3 * 16 + 2 * 4, 16)
    assert "tiny-siglip" in (tmp_path / "seg.md").read_text()
