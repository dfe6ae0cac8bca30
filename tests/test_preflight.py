"""Preflight of a training run (llava.train.preflight, llava.train.run_dir, llava.model.model_dirs; issue 15).

Each bad input is refused before a model is built and leaves no file behind; two runs into one directory:
the second refuses at once; a rerun into a trained directory resumes only a run of the same settings.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import train_fixtures
from train_fixtures import run_main, train_argv

from llava.train.run_dir import IDENTITY_FILE, LOCK_FILE
from llava.train.sampling import read_sample_order

train_data = train_fixtures.train_data  # the session fixture, shared through a module cache

REPO = Path(__file__).resolve().parents[1]


def _from_checkpoint(train_data, out: Path, checkpoint: Path) -> list[str]:
    argv = train_argv(train_data, out, "sft")
    return [a for a in argv if not a.startswith(("--llm=", "--vision_tower="))] + [
        f"--model_name_or_path={checkpoint}"
    ]


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            {"vision_tower": "siglip2-so61"},
            "--vision_tower 'siglip2-so61': not a preset.*closest presets: siglip2-so16",
        ),
        ({"llm": "qwen2.5-1.5"}, "--llm 'qwen2.5-1.5': not a preset.*closest presets: qwen2.5-1.5b"),
        ({"llm": "./no/such/llm"}, "--llm './no/such/llm': no such file or directory"),
        ({"data_path": "/no/such/data.json"}, "/no/such/data.json: --data_path: no such file"),
        ({"image_folder": "/no/such/images"}, "--image_folder /no/such/images: no such directory"),
    ],
)
def test_bad_names_and_paths_are_refused_before_anything_is_written(train_data, tmp_path, flags, message):
    out = tmp_path / "out"
    with pytest.raises(Exception, match=message):
        run_main(train_argv(train_data, out, "sft", **flags))
    assert not out.exists()


def test_hub_ids_and_local_paths_pass_the_name_check(tmp_path):
    from llava.train.preflight import check_model_name

    check_model_name("--vision_tower", "google/siglip2-so400m-patch16-384", ["siglip2-so16"])
    check_model_name("--vision_tower", "SigLIP2-So16", ["siglip2-so16"])
    check_model_name("--vision_tower", str(tmp_path), ["siglip2-so16"])


@pytest.fixture(scope="module")
def model_dirs(train_data, tmp_path_factory):
    """An LLM-only folder, an exported encoder and a LLaVA checkpoint without export.json."""
    import transformers

    from llava.export import export_vision_tower
    from llava.model.builder import ModelConfig, build_model, save_model

    root = tmp_path_factory.mktemp("model_dirs")
    export = export_vision_tower(str(train_data.vision_tower), root / "export")
    transformers.set_seed(0)
    model, tokenizer, processor = build_model(
        ModelConfig(llm=str(train_data.llm), vision_tower=str(train_data.vision_tower))
    )
    save_model(model, tokenizer, processor, root / "llava")
    return {"llm": train_data.llm, "export": export, "llava": root / "llava"}


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("llm", "an LLM-only checkpoint"),
        ("export", "an exported encoder"),
        ("vision_encoder", "a vision encoder alone"),
    ],
)
def test_a_checkpoint_that_is_no_llava_model_is_refused_with_one_line(
    train_data, model_dirs, tmp_path, kind, message
):
    # Before: LlavaForConditionalGeneration.from_pretrained built a default-size random LLaVA (rc 137).
    path = model_dirs["export"] / "vision_encoder" if kind == "vision_encoder" else model_dirs[kind]
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=f"--model_name_or_path {path}: {message}") as error:
        run_main(_from_checkpoint(train_data, out, path))
    assert "\n" not in str(error.value)
    assert not out.exists()


def test_gradcam_refuses_an_llm_only_checkpoint(train_data, tmp_path):
    from analysis.gradcam import main

    with pytest.raises(ValueError, match=f"--checkpoint {train_data.llm}: an LLM-only checkpoint"):
        main(
            [
                "--checkpoint",
                str(train_data.llm),
                "--data_path",
                str(train_data.dpo_json),
                "--out_dir",
                str(tmp_path),
            ]
        )


def test_analysis_of_a_llava_checkpoint_without_export_points_at_llava_export(model_dirs):
    # Before: AttributeError: 'LlavaModel' object has no attribute 'vision_model'.
    from analysis.features import load_encoder

    with pytest.raises(ValueError, match="without export.json.*python -m llava.export"):
        load_encoder(model_dirs["llava"])


def test_an_incomplete_llava_checkpoint_is_refused(train_data, model_dirs, tmp_path):
    partial = tmp_path / "checkpoint-4"
    partial.mkdir()
    (partial / "config.json").write_text((model_dirs["llava"] / "config.json").read_text())
    with pytest.raises(ValueError, match="no weight files"):
        run_main(_from_checkpoint(train_data, tmp_path / "out", partial))


def test_a_file_named_checkpoint_n_is_refused_up_front(train_data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint-2").write_text("not a checkpoint")
    with pytest.raises(FileExistsError, match="checkpoint-2 is a file"):
        run_main(train_argv(train_data, out, "dpo", save_strategy="steps", save_steps=2))
    assert _files(out) == ["checkpoint-2"], "no reference cache, lock or identity written"


def test_an_output_dir_below_a_file_is_refused(train_data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(NotADirectoryError, match="is a file, not a directory"):
        run_main(train_argv(train_data, blocker / "out", "sft"))
    assert _files(tmp_path) == ["file"]


def _hold_lock(out: Path) -> subprocess.Popen:
    code = (
        "import sys, time\nfrom llava.train.run_dir import RunLock\n"
        f"RunLock({str(out)!r}).acquire()\nprint('locked', flush=True)\ntime.sleep(120)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_run_into_a_locked_directory_refuses_at_once(train_data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    holder = _hold_lock(out)
    try:
        start = time.perf_counter()
        with pytest.raises(RuntimeError, match=f"is in use by another run \\(pid {holder.pid} on "):
            run_main(train_argv(train_data, out, "dpo"))
        assert time.perf_counter() - start < 10, "refused before building a model"
        assert _files(out) == [LOCK_FILE], "the other run's lock is kept, nothing else written"
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_is_taken_over_with_a_warning(train_data, tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": "x"}))
    trainer = run_main(train_argv(train_data, out, "sft", max_steps=1))
    assert trainer.state.global_step == 1
    assert f"stale lock of pid {dead.pid}" in caplog.text
    assert not (out / LOCK_FILE).exists(), "released at the end of the run"
    assert json.loads((out / IDENTITY_FILE).read_text())["settings"]["loss_type"] == "sft"


def test_a_rerun_with_other_settings_refuses_naming_them_unless_overwrite(train_data, tmp_path):
    # Before: it "auto-resumed", trained 0 steps and rewrote training_args.json with settings never trained.
    out = tmp_path / "out"
    flags = {"max_steps": 2, "save_strategy": "steps", "save_steps": 2}
    first = train_fixtures.weights(run_main(train_argv(train_data, out, "sft", **flags)).model)
    before = _files(out)
    with pytest.raises(ValueError, match="started with other settings") as error:
        run_main(train_argv(train_data, out, "sft", **flags, learning_rate=5e-6, seed=1))
    assert "learning_rate: 0.001 -> 5e-06" in str(error.value) and "seed: 0 -> 1" in str(error.value)
    assert "loss_type" not in str(error.value)
    assert _files(out) == before
    trainer = run_main(
        train_argv(train_data, out, "sft", **flags, learning_rate=5e-6, overwrite_output_dir=True)
    )
    # Trained afresh: a resume from the old checkpoint-2 would train 0 steps and keep the first run's weights.
    assert trainer.state.global_step == 2
    assert train_fixtures.max_abs_diff(train_fixtures.weights(trainer.model), first) > 1e-4
    assert [row["step"] for row in read_sample_order(out)] == [1, 2]
    settings = json.loads((out / IDENTITY_FILE).read_text())["settings"]
    assert settings["learning_rate"] == 5e-6


def test_dpo_into_a_finished_sft_dir_without_checkpoints_refuses(train_data, tmp_path):
    # Before: with --save_strategy no it replaced the SFT model silently.
    out = tmp_path / "out"
    run_main(train_argv(train_data, out, "sft", max_steps=1))
    model = (out / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="loss_type: 'sft' -> 'dpo'"):
        run_main(train_argv(train_data, out, "dpo", max_steps=1))
    assert not (out / "ref_logps.json").exists() and (out / "model.safetensors").read_bytes() == model


def test_a_changed_data_file_is_a_different_run(train_data, tmp_path):
    data = tmp_path / "sft.json"
    data.write_text(train_data.sft_json.read_text())
    out = tmp_path / "out"
    run_main(train_argv(train_data, out, "sft", max_steps=1, data_path=data))
    records = json.loads(data.read_text())
    data.write_text(json.dumps(records[::-1]))
    with pytest.raises(ValueError, match=f"data.files: .*{data.name}"):
        run_main(train_argv(train_data, out, "sft", max_steps=1, data_path=data))


def test_a_run_that_fails_before_saving_removes_the_directories_it_made(train_data, tmp_path):
    data = tmp_path / "three.json"
    data.write_text(json.dumps(train_data.records("sft")[:3]))
    out = tmp_path / "runs" / "stage2" / "out"
    with pytest.raises(ValueError, match="fewer than one optimizer step"):
        run_main(train_argv(train_data, out, "sft", data_path=data, gradient_accumulation_steps=2))
    assert not (tmp_path / "runs").exists(), "no lock, identity or empty directory left behind"


def test_a_trained_dir_without_identity_resumes_only_a_named_checkpoint(train_data, tmp_path):
    out = tmp_path / "out"
    flags = {"save_strategy": "steps", "save_steps": 2}
    run_main(train_argv(train_data, out, "sft", max_steps=2, **flags))
    (out / IDENTITY_FILE).unlink()  # a run made before identities were recorded
    with pytest.raises(ValueError, match="without run_identity.json.*--resume_from_checkpoint"):
        run_main(train_argv(train_data, out, "sft", max_steps=3, **flags))
    resumed = run_main(
        train_argv(train_data, out, "sft", max_steps=3, resume_from_checkpoint=out / "checkpoint-2", **flags)
    )
    assert resumed.state.global_step == 3 and (out / IDENTITY_FILE).is_file()


def test_duplicate_ids_in_sft_data_refuse(train_data, tmp_path):
    # Before: only a warning; sample_order.jsonl then no longer identified samples.
    records = train_data.records("sft")[:4]
    records[3] = {**records[3], "id": records[0]["id"]}
    data = tmp_path / "sft.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "out"
    with pytest.raises(
        ValueError, match=f"1 sample id\\(s\\) occur more than once \\('{records[0]['id']}' x2 in {data}\\)"
    ):
        run_main(train_argv(train_data, out, "sft", data_path=data))
    assert not out.exists()


def test_every_data_path_form_passes_the_data_check(tmp_path, monkeypatch):
    """Files, save_to_disk dirs, parquet files and globs, hub ids and mixtures of them (llava.data.sources)."""
    from datasets import Dataset

    from llava.train.preflight import data_files

    monkeypatch.chdir(tmp_path)
    conversations = [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]
    table = Dataset.from_list([{"id": "t0", "conversations": conversations}])
    Path("p").mkdir()
    table.to_parquet("p/one.parquet")
    table.to_parquet("p/two.parquet")
    table.save_to_disk("saved")
    Path("a.json").write_text(json.dumps([{"id": "j0", "conversations": conversations}]))
    saved = sorted(str(p) for p in Path("saved").iterdir())
    assert data_files("saved") == (saved, [])
    assert data_files("saved:train") == (saved, [])
    assert data_files("p/one.parquet") == (["p/one.parquet"], [])
    assert data_files("p/*.parquet") == (["p/one.parquet", "p/two.parquet"], [])
    assert data_files("lmms-lab/LLaVA-OneVision-Data:CLEVR-Math(MathV360K)") == (
        [],
        ["lmms-lab/LLaVA-OneVision-Data:CLEVR-Math(MathV360K)"],
    )
    Path("mix.yaml").write_text(
        "datasets:\n  - json_path: a.json\n  - json_path: saved\n  - json_path: p/*.parquet\n"
        "  - json_path: org/name:cfg:validation\n    sampling_strategy: first:1\n"
    )
    files, hub_ids = data_files("mix.yaml")
    expected = ["mix.yaml", "a.json", *saved, "p/one.parquet", "p/two.parquet"]
    assert [os.path.relpath(f) for f in files] == expected and hub_ids == ["org/name:cfg:validation"]


@pytest.mark.parametrize(
    ("data_path", "message"),
    [
        ("missing.json", "missing.json: --data_path: no such file"),
        ("missing.parquet", "missing.parquet: --data_path: no such file, directory or parquet files"),
        ("data/*.parquet", "data/\\*.parquet: --data_path: no such file, directory or parquet files"),
        ("/no/such/saved", "/no/such/saved: --data_path: no such file"),
        ("gone.yaml", "gone.yaml: --data_path: no such file"),
        ("mix.yaml", "mix.yaml: --data_path: datasets\\[1\\].json_path 'gone.parquet' not found"),
    ],
)
def test_a_missing_data_source_is_refused_naming_it(tmp_path, monkeypatch, data_path, message):
    from llava.train.preflight import data_files

    monkeypatch.chdir(tmp_path)
    Path("a.json").write_text("[]")
    Path("mix.yaml").write_text("datasets:\n  - json_path: a.json\n  - json_path: gone.parquet\n")
    with pytest.raises(ValueError, match=message):
        data_files(data_path)


def test_a_run_trains_on_a_saved_dataset_and_its_identity_follows_the_table(train_data, tmp_path):
    from datasets import Dataset

    saved = tmp_path / "saved"
    Dataset.from_list(train_data.records("sft")[:8]).save_to_disk(str(saved))
    out = tmp_path / "out"
    run_main(train_argv(train_data, out, "sft", max_steps=1, data_path=saved))
    identity = json.loads((out / IDENTITY_FILE).read_text())["settings"]
    assert {Path(f).parent for f in identity["data.files"]} == {saved}
    Dataset.from_list(train_data.records("sft")[8:16]).save_to_disk(str(saved))
    with pytest.raises(ValueError, match="data.files: "):
        run_main(train_argv(train_data, out, "sft", max_steps=1, data_path=saved))
