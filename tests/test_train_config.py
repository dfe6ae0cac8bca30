"""Configuration checks of the Stage-2 entry point (llava/train), without training: options that the
trainer would accept and ignore, the precision the model is loaded in, the reference-cache fingerprint
(weights retrained at the same path must invalidate the cache) and the cache's atomic write.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from llava.train import reference
from llava.train.args import DataArguments, ModelArguments, PivotTrainingArguments
from llava.train.reference import load_reference_logps, save_reference_logps
from llava.train.train import reference_fingerprint


def _args(tmp_path: Path, **kwargs) -> PivotTrainingArguments:
    return PivotTrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", **kwargs)


# ---- options accepted but ignored ----------------------------------------------------------------


def test_label_smoothing_is_refused(tmp_path):
    with pytest.raises(ValueError, match="--label_smoothing_factor"):
        _args(tmp_path, label_smoothing_factor=0.1)


@pytest.mark.parametrize("flag", [{"gamma": 0.5}, {"dpo_alpha": 0.5}])
def test_preference_weights_are_refused_for_sft(tmp_path, flag: dict):
    with pytest.raises(ValueError, match="--loss_type sft"):
        _args(tmp_path, loss_type="sft", reference="none", **flag)
    _args(tmp_path, loss_type="dpo", **flag)  # where they mean something


def test_other_sampling_strategies_and_unused_loss_options_warn(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="llava.train.args"):
        _args(tmp_path, train_sampling_strategy="group_by_length")
        _args(tmp_path, loss_type="sft", reference="none", beta=0.2)
        _args(tmp_path, loss_type="dpo", mpo_weights="1,0,0")
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "--train_sampling_strategy group_by_length is ignored" in messages
    assert "--beta 0.2: ignored by --loss_type sft" in messages
    assert "--mpo_weights 1,0,0: ignored by --loss_type dpo" in messages
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="llava.train.args"):
        _args(tmp_path, loss_type="sft", reference="none")  # the defaults a shared launcher passes
        _args(tmp_path, loss_type="mpo", mpo_weights="1,0,0", beta=0.2)
    assert not caplog.records


# ---- precision ---------------------------------------------------------------------------------------


def test_bf16_loads_fp32_weights_unless_deepspeed_keeps_master_copies(tmp_path):
    args = _args(tmp_path, bf16=True)
    assert (args.weights_dtype, args.autocast_dtype) == ("float32", torch.bfloat16)
    args.deepspeed = {"zero_optimization": {"stage": 2}}  # attached after validation (imports DeepSpeed)
    assert (args.weights_dtype, args.autocast_dtype) == ("bfloat16", None)
    plain = _args(tmp_path)
    assert (plain.weights_dtype, plain.autocast_dtype) == ("float32", None)


# ---- reference-cache fingerprint -----------------------------------------------------------------------


def _write_weights(model_dir: Path, value: float, mtime_ns: int) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.full((4, 4), value)}, str(model_dir / "model.safetensors"))
    (model_dir / "config.json").write_text(json.dumps({"model_type": "llava"}))
    for name in ("model.safetensors", "config.json"):
        os.utime(model_dir / name, ns=(mtime_ns, mtime_ns))  # coarse filesystem clocks could tie


def _fingerprint(tmp_path: Path, model_dir: Path, bf16: bool = False, **model_flags) -> dict:
    model_args = ModelArguments(model_name_or_path=str(model_dir), **model_flags)
    data_args = DataArguments(data_path=str(tmp_path / "dpo.json"), image_folder=str(tmp_path))
    return reference_fingerprint(model_args, data_args, _args(tmp_path, bf16=bf16))


def test_retrained_weights_at_the_same_path_invalidate_the_cache(tmp_path):
    model_dir = tmp_path / "stage1"
    _write_weights(model_dir, 0.0, 1_000_000_000_000_000_000)
    cache = tmp_path / "ref_logps.json"
    save_reference_logps(cache, {"a": (-1.0, -2.0)}, reference=_fingerprint(tmp_path, model_dir))
    assert load_reference_logps(cache, ["a"], reference=_fingerprint(tmp_path, model_dir)) == {
        "a": (-1.0, -2.0)
    }
    _write_weights(model_dir, 1.0, 1_000_000_001_000_000_000)
    with pytest.raises(ValueError, match="was made for"):
        load_reference_logps(cache, ["a"], reference=_fingerprint(tmp_path, model_dir))


@pytest.mark.parametrize(
    "change",
    [
        {"mm_vision_select_layer": -1},
        {"image_aspect_ratio": "anyres_max_9"},
        {"pretrain_mm_mlp_adapter": "projector"},
        {"bf16": True},
    ],
)
def test_model_flags_and_dtype_are_in_the_fingerprint(tmp_path, change: dict):
    model_dir = tmp_path / "stage1"
    _write_weights(model_dir, 0.0, 1_000_000_000_000_000_000)
    if "pretrain_mm_mlp_adapter" in change:
        _write_weights(tmp_path / "projector", 0.5, 1_000_000_000_000_000_000)
        change = {"pretrain_mm_mlp_adapter": str(tmp_path / "projector")}
    base = _fingerprint(tmp_path, model_dir)
    assert _fingerprint(tmp_path, model_dir) == base
    assert json.loads(json.dumps(base)) == base, "the fingerprint must survive the JSON cache unchanged"
    assert _fingerprint(tmp_path, model_dir, **change) != base


def test_retrained_projector_adapter_changes_the_fingerprint(tmp_path):
    model_dir, projector = tmp_path / "stage1", tmp_path / "projector"
    _write_weights(model_dir, 0.0, 1_000_000_000_000_000_000)
    _write_weights(projector, 0.0, 1_000_000_000_000_000_000)
    before = _fingerprint(tmp_path, model_dir, pretrain_mm_mlp_adapter=str(projector))
    _write_weights(projector, 1.0, 1_000_000_001_000_000_000)
    assert _fingerprint(tmp_path, model_dir, pretrain_mm_mlp_adapter=str(projector)) != before


# ---- atomic cache write ---------------------------------------------------------------------------------


def test_reference_cache_is_replaced_atomically(tmp_path, monkeypatch):
    path = tmp_path / "ref_logps.json"
    save_reference_logps(path, {"a": (-1.0, -2.0)}, reference="old")
    real_replace = os.replace
    replaced = []

    def checked_replace(src, dst):
        # At the moment the new cache becomes visible it is complete, and until then readers see the old one.
        assert Path(src).parent == path.parent and Path(dst) == path
        assert json.loads(Path(src).read_text())["reference"] == "new"
        assert json.loads(path.read_text())["reference"] == "old"
        replaced.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(reference.os, "replace", checked_replace)
    save_reference_logps(path, {"a": (-3.0, -4.0)}, reference="new")
    assert len(replaced) == 1
    assert load_reference_logps(path, ["a"], reference="new") == {"a": (-3.0, -4.0)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref_logps.json"], "no temporary file is left"

    with pytest.raises(TypeError):  # a failed write leaves the previous cache and no temporary file
        save_reference_logps(path, {"a": (object(), -1.0)}, reference="broken")
    assert load_reference_logps(path, ["a"], reference="new") == {"a": (-3.0, -4.0)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref_logps.json"]
