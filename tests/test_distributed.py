"""Training across processes (issue 9), on CPU: gloo backend, tiny presets, the 12 MMPR pairs of
tests/train_fixtures.py.

- 2 processes × batch 2 equal 1 process × batch 2 × accumulation 2, for SFT and DPO: every logged
  number (loss, grad norm, LR, reduced metrics), the final weights, and `sample_order.jsonl`; the matched
  sample order is also the same for SFT and DPO across ranks.
- A 2-process run resumed inside epoch 2 logs the same `sample_order.jsonl` as the uninterrupted run
  (accelerate's resume wrappers hide the sampler from every `set_epoch` call but the trainer's own).
- Reference log-probs on two nodes (one process each, both LOCAL_RANK 0): only global rank 0 scores
  and writes the cache, the other node waits and reads it.
- The launch logic of scripts/train/common.sh (torchrun / DeepSpeed launcher commands, NCCL defaults,
  gradient accumulation) with a stub interpreter, its torchrun flags checked by torchrun's own parser.
- Parameter groups under a ZeRO config. transformers 5.23 (`integrations/deepspeed.py`,
  `deepspeed_init` → `deepspeed_optim_sched`): when the DeepSpeed config has no `optimizer` block it
  calls `trainer.create_optimizer()` (our per-module groups) and sets `zero_allow_untested_optimizer`;
  accelerate's `_prepare_deepspeed` then passes that optimizer to `deepspeed.initialize(optimizer=...)`,
  whose ZeRO optimizer wraps the client optimizer's `param_groups` (with CPU offload accelerate rebuilds
  DeepSpeedCPUAdam from the same `param_groups`); the HF scheduler is created afterwards on the wrapped
  optimizer, per group. With an `optimizer` block HF builds a `DummyOptim` instead, DeepSpeed makes the
  optimizer from the config and our groups are lost, hence `check_deepspeed_config` refuses that block.
- ZeRO-3 runs with DeepSpeed itself (skipped when `deepspeed` is not importable; it is a GPU extra), on
  its CPU accelerator with one process: save and export equal a plain run. `run_zero3` and friends are
  shared with tests/test_gpu.py.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import train_fixtures
from safetensors.torch import load_file
from train_fixtures import make_trainer, run_main, train_argv

from llava.train.param_groups import build_param_groups
from llava.train.run_dir import IDENTITY_FILE
from llava.train.sampling import SAMPLE_ORDER_FILE, read_sample_order

train_data = train_fixtures.train_data  # the session fixture, shared through a module cache

REPO = Path(__file__).resolve().parents[1]
ZERO3 = REPO / "scripts" / "zero3.json"
ZERO2 = REPO / "scripts" / "zero2.json"
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
RUN_FLAGS = {"max_steps": 3, "learning_rate": 1e-3}  # 3 steps × global batch 4 = the 12 pairs once
# Timings, and HF's FLOP estimate (6 × parameter count × tokens: ZeRO-3 partitions report no parameters).
NOT_COMPARED = (
    "samples/s",
    "tokens/s",
    "train_runtime",
    "train_samples_per_second",
    "train_steps_per_second",
    "total_flos",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(argv: list[str], nproc: int, timeout: int = 600) -> None:
    """`python -m torch.distributed.run ... -m llava.train.train ARGV`; fails with the output's tail."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "-m",
        "llava.train.train",
        *argv,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-40:])
        pytest.fail(f"torchrun exited {proc.returncode}: {' '.join(cmd)}\n{tail}")


def log_history(output_dir: Path) -> list[dict]:
    return json.loads((output_dir / "trainer_state.json").read_text())["log_history"]


def assert_same_logs(a: list[dict], b: list[dict], atol: float = 1e-5) -> None:
    assert len(a) == len(b) and len(a) >= 2
    for row_a, row_b in zip(a, b):
        keys = sorted(k for k in row_a if k not in NOT_COMPARED)
        assert keys == sorted(k for k in row_b if k not in NOT_COMPARED)
        for key in keys:
            # HF rounds the logged loss to 4 decimals; everything else is logged at full precision.
            tol = 1e-4 if key in ("loss", "train_loss") else atol
            assert row_a[key] == pytest.approx(row_b[key], rel=1e-5, abs=tol), (row_a.get("step"), key)


def assert_same_weights(dir_a: Path, dir_b: Path, atol: float = 1e-4) -> None:
    a, b = load_file(str(dir_a / "model.safetensors")), load_file(str(dir_b / "model.safetensors"))
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= atol, f"weights differ by up to {worst:.2e}"


# ---- 2 processes == 1 process with gradient accumulation 2 --------------------------------------------
@pytest.fixture(scope="module")
def paired_runs(train_data, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """loss type → (2-process run dir, 1-process accumulation-2 run dir)."""
    runs = {}
    for loss_type in ("sft", "dpo"):
        root = tmp_path_factory.mktemp(f"ddp_{loss_type}")
        two, one = root / "2proc", root / "1proc_ga2"
        torchrun([*train_argv(train_data, two, loss_type, **RUN_FLAGS), "--ddp_backend=gloo"], nproc=2)
        run_main(train_argv(train_data, one, loss_type, gradient_accumulation_steps=2, **RUN_FLAGS))
        runs[loss_type] = (two, one)
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["sft", "dpo"])
def test_two_processes_equal_one_process_with_accumulation(paired_runs, loss_type: str):
    two, one = paired_runs[loss_type]
    logs_two, logs_one = log_history(two), log_history(one)
    assert [row.get("step") for row in logs_two] == [1, 2, 3, 3]  # 3 steps, then the train summary
    assert_same_logs(logs_two, logs_one)
    assert_same_weights(two, one)
    assert read_sample_order(two) == read_sample_order(one)


@pytest.mark.slow
def test_matched_sample_order_holds_across_ranks(paired_runs, train_data):
    sft, dpo = read_sample_order(paired_runs["sft"][0]), read_sample_order(paired_runs["dpo"][0])
    assert sft == dpo, "SFT and DPO must see the same samples in the same order with 2 processes"
    ids = [i for row in sft for i in row["ids"]]
    assert [len(row["ids"]) for row in sft] == [4, 4, 4], "each step logs both ranks' samples"
    assert sorted(ids) == sorted(train_data.ids), "every sample exactly once per epoch, none lost or repeated"


@pytest.mark.slow
def test_two_process_resume_inside_epoch_two_keeps_the_epoch_order(train_data, tmp_path):
    # 8 pairs, 2 processes × batch 2: 2 steps per epoch, 4 in all; checkpoint-3 is one step into epoch 2.
    data = train_data.subset(8, tmp_path / "data")
    flags = {"max_steps": -1, "num_train_epochs": 2, "save_strategy": "steps", "save_steps": 3}
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    argv = lambda out: [*train_argv(data, out, "sft", export_encoder=False, **flags), "--ddp_backend=gloo"]  # noqa: E731
    torchrun(argv(full), nproc=2)
    expected = read_sample_order(full)
    assert [row["step"] for row in expected] == [1, 2, 3, 4]
    assert expected[3]["ids"] != expected[1]["ids"], "replaying epoch 1 at step 4 must be detectable"

    # The run as it was when checkpoint-3 was written (steps 1-3 marked, stale step 4 to be re-logged).
    shutil.copytree(full / "checkpoint-3", resumed / "checkpoint-3")
    shutil.copy(full / IDENTITY_FILE, resumed / IDENTITY_FILE)  # the run's settings (llava.train.run_dir)
    rows = [{**row, "marker": True} for row in expected[:3]] + [{**expected[3], "ids": ["stale"]}]
    (resumed / SAMPLE_ORDER_FILE).write_text("".join(json.dumps(row) + "\n" for row in rows))
    torchrun(argv(resumed), nproc=2)  # same OUTPUT_DIR: auto-resumes from checkpoint-3
    order = read_sample_order(resumed)
    assert [row.get("marker", False) for row in order] == [True, True, True, False], "resumed at step 3"
    assert [{k: v for k, v in row.items() if k != "marker"} for row in order] == expected


TWO_NODES_SCRIPT = """
import json, sys, time
import torch
import llava.train.train as train
from llava.train.args import PivotTrainingArguments

out = sys.argv[1]
args = PivotTrainingArguments(output_dir=out, loss_type="dpo", use_cpu=True, ddp_backend="gloo", report_to="none")

def scoring(model, dataset, *rest):  # stands in for the reference model's pass over the data
    open(f"{out}/scored_by_{args.process_index}", "w").close()
    time.sleep(1.0)
    return {i: (-1.0 - args.process_index, -2.0) for i in dataset.ids}

class Records:
    ids = ["a", "b"]

    def skipped_ids(self):
        return set()

train.compute_reference_logps = scoring
logps = train.reference_logps(torch.nn.Linear(1, 1), Records(), None, args, {"run": "two nodes"})
result = {"local_process_index": args.local_process_index, "world_size": args.world_size, "logps": logps}
(open(f"{out}/result_{args.process_index}.json", "w")).write(json.dumps(result))
"""


@pytest.mark.slow
def test_reference_logps_are_scored_once_across_nodes(tmp_path):
    script = tmp_path / "two_nodes.py"
    script.write_text(TWO_NODES_SCRIPT)
    port = str(free_port())
    procs = []
    for rank in (0, 1):  # two nodes of one process each: both are their node's local main process
        env = {
            **os.environ,
            **{"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"},
            **{"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"},
        }
        cmd = [sys.executable, str(script), str(tmp_path)]
        procs.append(
            subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        )
    for proc in procs:
        output = proc.communicate(timeout=300)[0].decode()
        assert proc.returncode == 0, output[-3000:]
    results = [json.loads((tmp_path / f"result_{rank}.json").read_text()) for rank in (0, 1)]
    assert [(r["local_process_index"], r["world_size"]) for r in results] == [(0, 2), (0, 2)]
    assert sorted(p.name for p in tmp_path.glob("scored_by_*")) == ["scored_by_0"]
    assert results[0]["logps"] == results[1]["logps"] == {"a": [-1.0, -2.0], "b": [-1.0, -2.0]}


# ---- launch logic of scripts/train/common.sh ---------------------------------------------------------
STUB = """#!/bin/bash
if [ "$1" = "-c" ]; then
  case "$2" in *is_available*) echo "$STUB_CUDA" ;; *device_count*) echo 8 ;; esac
  exit 0
fi
printf '%s\\n' "$@" > "$STUB_OUT"
env | grep -E '^(OMP_NUM_THREADS|TORCH_NCCL_ASYNC_ERROR_HANDLING|NCCL_ASYNC_ERROR_HANDLING)=' | sort >> "$STUB_OUT"
"""


COMMON_SH_VARIABLES = (
    *("NUM_GPUS", "NNODES", "RANK", "ADDR", "PORT", "GLOBAL_BATCH", "PER_DEVICE_BATCH", "DEEPSPEED"),
    *("LAUNCHER", "HOSTFILE", "DDP_TIMEOUT", "OMP_NUM_THREADS", "TORCH_NCCL_ASYNC_ERROR_HANDLING"),
    "NCCL_ASYNC_ERROR_HANDLING",
)
ENV_PREFIXES = ("OMP_NUM_THREADS=", "TORCH_NCCL_ASYNC_ERROR_HANDLING=", "NCCL_ASYNC_ERROR_HANDLING=")


def launch(tmp_path: Path, cuda: bool = True, **env: str) -> tuple[int, list[str], str]:
    """Source common.sh with a stub interpreter; returns (exit status, launched argv + env lines, stderr)."""
    stub, out = tmp_path / "python", tmp_path / "argv.txt"
    stub.write_text(STUB)
    stub.chmod(0o755)
    out.unlink(missing_ok=True)
    script = 'source scripts/train/common.sh && echo "GA=$(pivot_grad_accum)" >&2 && pivot_launch --foo bar'
    clean = {
        k: v for k, v in os.environ.items() if k not in COMMON_SH_VARIABLES and not k.startswith("STUB_")
    }
    full_env = {**clean, "PYTHON": str(stub), "STUB_OUT": str(out), "STUB_CUDA": "1" if cuda else "0", **env}
    proc = subprocess.run(["bash", "-c", script], cwd=REPO, env=full_env, capture_output=True, text=True)
    lines = out.read_text().splitlines() if out.exists() else []
    return proc.returncode, lines, proc.stderr


def test_torchrun_launch_for_two_nodes(tmp_path):
    rc, lines, err = launch(tmp_path, NUM_GPUS="8", NNODES="2", RANK="1", ADDR="10.0.0.1", PORT="1234")
    assert rc == 0, err
    assert "GA=4" in err  # 256 / (4 per device × 8 GPUs × 2 nodes)
    env = sorted(line for line in lines if line.startswith(ENV_PREFIXES))
    argv = [line for line in lines if not line.startswith(ENV_PREFIXES)]
    module = argv.index("llava.train.train")
    assert argv[:2] == ["-m", "torch.distributed.run"]
    from torch.distributed.run import get_args_parser

    parsed = get_args_parser().parse_args(argv[2 : module + 1])
    assert (parsed.nproc_per_node, parsed.nnodes, parsed.node_rank) == ("8", "2", 1)
    assert (parsed.master_addr, parsed.master_port, parsed.module) == ("10.0.0.1", 1234, True)
    assert (parsed.training_script, parsed.training_script_args) == ("llava.train.train", [])
    flags = argv[module + 1 :]
    assert flags[-2:] == ["--foo", "bar"], "extra arguments are passed through, last"
    settings = dict(zip(flags[:-2:2], flags[1:-2:2]))
    assert settings["--deepspeed"] == str(ZERO3) and settings["--bf16"] == "True"
    assert settings["--gradient_checkpointing"] == "True"
    assert json.loads(settings["--gradient_checkpointing_kwargs"]) == {"use_reentrant": False}
    assert int(settings["--ddp_timeout"]) > 1800, "rank 0's reference pass must not trip the barrier timeout"
    cores = os.cpu_count() or 1
    assert env == [
        "NCCL_ASYNC_ERROR_HANDLING=1",
        f"OMP_NUM_THREADS={max(cores // 8, 1)}",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
    ]


def test_deepspeed_launcher_single_and_multi_node(tmp_path):
    rc, lines, err = launch(tmp_path, NUM_GPUS="4", LAUNCHER="deepspeed", PORT="4321")
    assert rc == 0, err
    argv = lines[: lines.index("llava.train.train") + 1]
    assert argv == [
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus=4",
        "--master_addr=127.0.0.1",
        "--master_port=4321",
        "--no_local_rank",
        "--module",
        "llava.train.train",
    ]
    rc, _, err = launch(
        tmp_path, NUM_GPUS="4", NNODES="2", LAUNCHER="deepspeed", HOSTFILE=str(tmp_path / "none")
    )
    assert rc != 0 and "HOSTFILE" in err
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=4\nnode1 slots=4\n")
    rc, lines, err = launch(
        tmp_path, NUM_GPUS="4", NNODES="2", RANK="1", LAUNCHER="deepspeed", HOSTFILE=str(hostfile)
    )
    assert rc == 0, err
    for flag in (f"--hostfile={hostfile}", "--no_ssh", "--node_rank=1", "--num_nodes=2"):
        assert flag in lines
    if HAS_DEEPSPEED:  # DeepSpeed's own parser accepts the command
        from deepspeed.launcher.runner import parse_args

        parse_args(lines[2 : lines.index("llava.train.train") + 1])
    rc, _, err = launch(tmp_path, NUM_GPUS="4", LAUNCHER="mpirun")
    assert rc != 0 and "torchrun or deepspeed" in err


def test_cpu_launch_is_one_plain_fp32_process(tmp_path):
    rc, lines, err = launch(tmp_path, cuda=False, NUM_GPUS="8")
    assert rc == 0, err
    assert lines[:6] == ["-m", "llava.train.train", "--use_cpu", "True", "--foo", "bar"]
    assert "--bf16" not in lines and "--deepspeed" not in lines


# ---- parameter groups under a ZeRO config ------------------------------------------------------------
LRS = {"learning_rate": 1e-5, "mm_vision_tower_lr": 2e-6, "mm_projector_lr": 1e-4, "weight_decay": 0.1}


def _group_summary(groups: list[dict]) -> list[tuple]:
    return sorted(
        (g["pivot_part"], g["lr"], g["weight_decay"], tuple(sorted(id(p) for p in g["params"])))
        for g in groups
    )


def test_zero_configs_have_auto_batch_values_and_no_optimizer_block():
    for path in (ZERO2, ZERO3):
        config = json.loads(path.read_text())
        assert "optimizer" not in config and "scheduler" not in config, path
        for key in (
            "train_batch_size",
            "train_micro_batch_size_per_gpu",
            "gradient_accumulation_steps",
            "gradient_clipping",
        ):
            assert config[key] == "auto", (path, key)
        assert config["bf16"]["enabled"] == "auto"
    assert (
        json.loads(ZERO3.read_text())["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
        is True
    )


@pytest.fixture
def optim_sched(monkeypatch):
    """transformers' `deepspeed_optim_sched`. It imports DummyOptim/DummyScheduler from accelerate.utils,
    which re-exports them from accelerate.utils.deepspeed only when DeepSpeed is installed."""
    import accelerate.utils
    from accelerate.utils import deepspeed as accelerate_deepspeed
    from transformers.integrations.deepspeed import deepspeed_optim_sched

    for name in ("DummyOptim", "DummyScheduler"):
        monkeypatch.setattr(accelerate.utils, name, getattr(accelerate_deepspeed, name), raising=False)
    return deepspeed_optim_sched


def test_hf_deepspeed_integration_wraps_our_parameter_groups(train_data, tmp_path, optim_sched):
    from accelerate.utils.deepspeed import HfDeepSpeedConfig

    trainer = make_trainer(train_data, tmp_path, deepspeed=str(ZERO3), loss_type="sft", **LRS)
    expected, _ = build_param_groups(trainer.model, 1e-5, 0.1, 2e-6, 1e-4)
    hf_config = HfDeepSpeedConfig(str(ZERO3))
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    optimizer, scheduler = optim_sched(trainer, hf_config, trainer.args, 10, params)
    assert optimizer is trainer.optimizer, "HF must hand DeepSpeed the trainer's own optimizer"
    assert scheduler is None, "HF creates its scheduler later, on the wrapped optimizer's groups"
    assert hf_config.config["zero_allow_untested_optimizer"] is True
    assert _group_summary(optimizer.param_groups) == _group_summary(expected)
    assert {g["lr"] for g in optimizer.param_groups} == {1e-5, 2e-6, 1e-4}


def test_optimizer_block_would_replace_our_groups_and_is_refused(train_data, tmp_path, optim_sched):
    from accelerate.utils.deepspeed import DummyOptim, HfDeepSpeedConfig

    config = {**json.loads(ZERO3.read_text()), "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}
    with pytest.raises(ValueError, match="mm_vision_tower_lr"):
        make_trainer(train_data, tmp_path, deepspeed=config, loss_type="sft", **LRS)
    trainer = make_trainer(train_data, tmp_path, deepspeed=config, loss_type="sft")  # one LR: allowed
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    optimizer, _ = optim_sched(trainer, HfDeepSpeedConfig(config), trainer.args, 10, params)
    assert isinstance(optimizer, DummyOptim), "with the block DeepSpeed builds the optimizer, not us"


def test_live_reference_is_refused_under_zero3_before_building_anything(tmp_path):
    from llava.train.args import DataArguments, ModelArguments, PivotTrainingArguments
    from llava.train.train import run

    args = PivotTrainingArguments(output_dir=str(tmp_path), loss_type="dpo", reference="live", use_cpu=True)
    args.deepspeed = str(ZERO3)  # attached after validation, which would import DeepSpeed
    model_args = ModelArguments(llm="/nonexistent/llm", vision_tower="/nonexistent/tower")
    with pytest.raises(ValueError, match="reference precomputed"):
        run(model_args, DataArguments(data_path="/nonexistent.json"), args)
    args.deepspeed = str(ZERO2)  # ZeRO-2 does not partition parameters: the check lets it through
    with pytest.raises(ValueError, match="--llm '/nonexistent/llm': no such file or directory"):  # preflight
        run(model_args, DataArguments(data_path="/nonexistent.json"), args)


# ---- ZeRO-3 with DeepSpeed (CPU accelerator here; CUDA in tests/test_gpu.py) ----------------------------
def zero3_argv(data, output_dir: Path, loss_type: str, cpu: bool, **flags: object) -> list[str]:
    """train_argv for a ZeRO-3 run under `torchrun` (CPU: gloo and --use_cpu; GPU: neither)."""
    argv = [a for a in train_argv(data, output_dir, loss_type, **flags) if a != "--use_cpu"]
    argv.append(f"--deepspeed={ZERO3}")
    return [*argv, "--use_cpu", "--ddp_backend=gloo"] if cpu else argv


def from_checkpoint(argv: list[str], checkpoint: Path) -> list[str]:
    """The same run started from a checkpoint instead of --llm/--vision_tower."""
    kept = [a for a in argv if not a.startswith(("--llm=", "--vision_tower="))]
    return [f"--model_name_or_path={checkpoint}", *kept]


def plain_run(argv: list[str], cpu: bool) -> None:
    if cpu:
        run_main(argv)
    else:
        torchrun([a for a in argv if a != "--use_cpu"], nproc=1)


@pytest.fixture(scope="module")
def checkpoint(train_data, tmp_path_factory) -> Path:
    """The tiny MLLM saved as a checkpoint: ZeRO-3 runs start from one (building from --llm/--vision_tower
    under ZeRO-3 is the known failure below)."""
    from llava.model.builder import ModelConfig, build_model, save_model

    out = tmp_path_factory.mktemp("zero3_start")
    torch.manual_seed(0)
    model, tokenizer, image_processor = build_model(
        ModelConfig(llm=str(train_data.llm), vision_tower=str(train_data.vision_tower))
    )
    save_model(model, tokenizer, image_processor, out)
    return out


def check_zero3_run(data, checkpoint: Path, root: Path, loss_type: str, cpu: bool, nproc: int) -> None:
    """A ZeRO-3 run (nproc processes, fp32) equals a plain 1-process run of the same global batch 4: logs,
    the saved checkpoint loaded back, the exported encoder loaded with transformers alone."""
    import transformers

    from llava.model.builder import load_model

    zero, plain = root / "zero3", root / "plain"
    flags = {**RUN_FLAGS, "gradient_accumulation_steps": 2}
    zero_argv = zero3_argv(data, zero, loss_type, cpu, per_device_train_batch_size=2 // nproc, **flags)
    torchrun(from_checkpoint(zero_argv, checkpoint), nproc=nproc)
    plain_run(from_checkpoint(train_argv(data, plain, loss_type, **flags), checkpoint), cpu)
    assert_same_logs(log_history(zero), log_history(plain), atol=1e-4)
    trained, _, _ = load_model(zero)
    reference, _, _ = load_model(plain)
    a, b = dict(trained.named_parameters()), dict(reference.named_parameters())
    assert a.keys() == b.keys()
    # Adam normalises each element's step (lr 1e-3): DPO's step-0 gradients are tiny, so reduction-order
    # noise in near-zero elements moves them by a fraction of one step; the logged losses match to 1e-4.
    weight_atol = 1e-4 if loss_type == "sft" else 3e-4
    assert max(float((a[k] - b[k]).abs().max().detach()) for k in a) < weight_atol
    start = dict(load_model(checkpoint)[0].named_parameters())
    assert any(not torch.equal(start[k], a[k]) for k in a), "the checkpoint holds trained weights"
    encoder = transformers.AutoModel.from_pretrained(zero / "vision_encoder")
    exported, tower = dict(encoder.named_parameters()), dict(trained.model.vision_tower.named_parameters())
    assert exported.keys() == tower.keys()
    assert all(torch.equal(exported[k], tower[k]) for k in tower)
    assert json.loads((zero / "export.json").read_text())["global_step"] == 3


GROUPS_SCRIPT = """
import json, sys
from llava.model.builder import load_model
from llava.train.args import PivotTrainingArguments
from llava.train.param_groups import TUNABLE_PARTS, build_param_groups, set_trainable_parts
from patches.zero3_init import zero3_init_disabled

checkpoint, out, deepspeed, cpu = sys.argv[1], sys.argv[2], sys.argv[3] or None, sys.argv[4] == "cpu"
extra = {"use_cpu": True, "ddp_backend": "gloo"} if cpu else {}
# Arguments first, as in llava.train.train: with a ZeRO-3 config they make from_pretrained partition.
args = PivotTrainingArguments(output_dir=out, loss_type="sft", reference="none", deepspeed=deepspeed, **extra)
with zero3_init_disabled():  # as llava.train.train builds it; DeepSpeed partitions at engine start
    model = load_model(checkpoint)[0]
set_trainable_parts(model, TUNABLE_PARTS)
specs = build_param_groups(model, 1e-5, 0.1, 2e-6, 1e-4)[1]
rows = sorted([s.part, s.decay, s.lr, s.weight_decay, sorted(s.names)] for s in specs)
with open(out + "/groups.json", "w") as handle:
    json.dump(rows, handle)
"""


def parameter_groups(checkpoint: Path, root: Path, deepspeed: Path | None, cpu: bool) -> list:
    """The optimizer groups `build_param_groups` makes for the checkpoint, built as train.py builds it."""
    root.mkdir(parents=True, exist_ok=True)
    script = root / "groups.py"
    script.write_text(GROUPS_SCRIPT)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=1",
        f"--master_port={free_port()}",
    ]
    cmd += [str(script), str(checkpoint), str(root), str(deepspeed or ""), "cpu" if cpu else "cuda"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((root / "groups.json").read_text())


def check_zero3_parameter_groups(checkpoint: Path, root: Path, cpu: bool) -> None:
    plain = parameter_groups(checkpoint, root / "plain", None, cpu)
    zero = parameter_groups(checkpoint, root / "zero3", ZERO3, cpu)
    lrs = lambda rows: {name: lr for _, _, lr, _, names in rows for name in names}  # noqa: E731
    assert lrs(zero) == lrs(plain), "every parameter keeps its part's learning rate under ZeRO-3"
    assert zero == plain, "decay / no-decay split (and so weight decay) must not change under ZeRO-3"


needs_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed (GPU extra)")


@pytest.mark.slow
@needs_deepspeed
def test_zero3_sft_save_and_export_on_cpu(train_data, checkpoint, tmp_path):
    check_zero3_run(train_data, checkpoint, tmp_path, "sft", cpu=True, nproc=1)


@pytest.mark.slow
@needs_deepspeed
def test_zero3_dpo_with_precomputed_reference_on_cpu(train_data, checkpoint, tmp_path):
    check_zero3_run(train_data, checkpoint, tmp_path, "dpo", cpu=True, nproc=1)


@pytest.mark.slow
@needs_deepspeed
def test_zero3_keeps_parameter_groups_on_cpu(checkpoint, tmp_path):
    check_zero3_parameter_groups(checkpoint, tmp_path, cpu=True)


@pytest.mark.slow
@needs_deepspeed
def test_zero3_builds_from_llm_and_vision_tower_on_cpu(train_data, tmp_path):
    torchrun(zero3_argv(train_data, tmp_path, "sft", cpu=True, max_steps=1), nproc=1)


@pytest.mark.slow
def test_mpo_running_delta_merges_every_ranks_batch_mean(train_data, tmp_path):
    # InternVL's MPO (TRL 0.10 RunningMoments + get_global_statistics): each update takes the mean reward
    # of every rank's micro-batch at once, so after 2 steps of 2 processes the running count is 4
    # (2 without the gather), and the checkpoint carries it for an exact resume.
    out = tmp_path / "mpo"
    flags = {"max_steps": 2, "save_strategy": "steps", "save_steps": 2, "reference": "live"}
    torchrun(
        [*train_argv(train_data, out, "mpo", export_encoder=False, **flags), "--ddp_backend=gloo"], nproc=2
    )
    saved = json.loads((out / "checkpoint-2" / "bco_running_mean.json").read_text())
    assert saved["count"] == pytest.approx(4)
    assert math.isfinite(saved["mean"])
