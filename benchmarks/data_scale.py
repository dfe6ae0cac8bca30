"""Data loading at scale: time to the first batch and peak RSS per rank (issue 17's benchmark).

N synthetic LLaVA records (one image each from a pool of small PNGs, a 20–200-word reply) in one .json
file, loaded by `--ranks` processes on one node, for four data layers:

- `json`: LLaVA-NeXT style, `json.load` of the whole file on every rank, no validation; the first batch
  parses, tokenises and collates only its own records;
- `old`: the data layer before issue 17 (kept as the list path): `load_records` + `MultimodalDataset` +
  `invalid_records()` on every rank;
- `store_cold`: the record store (llava.data.prepared): rank 0 builds the store and validates it with
  `--num_proc` workers while the other ranks wait at a gloo barrier, then every rank memory-maps both;
- `store_warm`: the same with both caches present (a resume, or the second run of a comparison).

Per rank: seconds from the start of loading (after imports) to the first collated batch of a
`MatchedSampler` order, peak RSS (`ru_maxrss`) and the RSS right after imports (its difference is what
the data layer costs). Rank 0's validation workers are separate processes (their peak is reported too).
Also the padding fraction (padded / computed tokens) of per-device micro-batches in the matched order
and with `--group_by_length` (`grouped_order`), over MMPR-like lengths: 576 image tokens + a prompt +
the longer of two replies of lognormal word counts.

Run: `python -m benchmarks.data_scale` (3.2M records, 8 ranks: a big machine) or `--quick` (200K
records, 2 ranks). `--json_out FILE` keeps every measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MODES = ("json", "old", "store_cold", "store_warm")
IMAGE_TOKENS = 576
WORDS = ("the", "a", "red", "blue", "small", "large", "cube", "sphere", "left", "right", "above", "below")


def status_mb(field: str) -> float:
    """A /proc/self/status memory field (VmHWM: peak RSS of this process image; VmRSS: current RSS) in MB.
    `ru_maxrss` is not used: Linux carries it over from the parent across fork and exec."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def write_data(work: Path, n: int, pool: int, seed: int) -> Path:
    from PIL import Image

    from llava.model.tiny_tokenizer import build_tiny_tokenizer

    rng = random.Random(seed)
    images = work / "images"
    images.mkdir(parents=True, exist_ok=True)
    for i in range(pool):
        Image.new("RGB", (48 + i % 5 * 8, 40 + i % 3 * 8), (i % 255, 80, 160)).save(images / f"{i}.png")
    records = []
    for i in range(n):
        reply = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 200)))
        records.append(
            {
                "id": f"rec{i}",
                "image": f"images/{i % pool}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nDescribe the scene."},
                    {"from": "gpt", "value": reply},
                ],
            }
        )
    data = work / "data.json"
    data.write_text(json.dumps(records))
    build_tiny_tokenizer().save_pretrained(str(work / "tokenizer"))
    return data


def first_batch(dataset, batch_size: int, pad_id: int):
    from torch.utils.data import DataLoader

    from llava.data.collator import DataCollator
    from llava.train.sampling import MatchedSampler

    sampler = MatchedSampler(dataset.ids, seed=0)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=DataCollator(pad_id))
    return next(iter(loader))


def worker(args: argparse.Namespace) -> None:
    """One simulated rank: load with `args.worker`, build the first batch, print one JSON line."""
    import torch.distributed as dist
    from transformers import AutoTokenizer
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    from llava.data.dataset import MultimodalDataset
    from llava.data.mixture import load_records
    from llava.data.prepared import DataSettings, prepare_dataset
    from llava.data.records import parse_record

    work = Path(args.work)
    tokenizer = AutoTokenizer.from_pretrained(str(work / "tokenizer"))
    processor = SiglipImageProcessorPil(size={"height": 64, "width": 64})
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    baseline = status_mb("VmRSS")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    dist.barrier()
    start = time.perf_counter()
    data, folder = str(work / "data.json"), str(work)
    common = (tokenizer, processor, "qwen_1_5", lambda h, w: IMAGE_TOKENS, 2048)
    if args.worker == "json":
        with open(data) as handle:
            raw = json.load(handle)
        order = random.Random(0).sample(range(len(raw)), args.batch_size)
        records = [parse_record(raw[i], data, i, "conversation", folder) for i in order]
        batch = first_batch(MultimodalDataset(records, *common), args.batch_size, tokenizer.pad_token_id)
    elif args.worker == "old":
        dataset = MultimodalDataset(load_records(data, folder, "conversation"), *common)
        dataset.invalid_records()
        batch = first_batch(dataset, args.batch_size, tokenizer.pad_token_id)
    else:
        settings = DataSettings(data, folder, "qwen_1_5", 2048, str(work / "cache"), num_proc=args.num_proc)
        if rank != 0:
            dist.barrier()  # main_process_first(local=False): rank 0 builds, the others wait
        prepared = prepare_dataset(settings, tokenizer, processor, common[3], build=rank == 0)
        if rank == 0:
            dist.barrier()
        batch = first_batch(prepared.dataset, args.batch_size, tokenizer.pad_token_id)
    seconds = time.perf_counter() - start
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # rank 0's map workers
    result = {
        "mode": args.worker,
        "rank": rank,
        "seconds_to_first_batch": round(seconds, 2),
        "peak_rss_mb": round(status_mb("VmHWM"), 1),
        "rss_after_imports_mb": round(baseline, 1),
        "validation_workers_peak_rss_mb": round(children, 1),
        "batch": list(batch["input_ids"].shape),
    }
    print("RESULT " + json.dumps(result), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_mode(mode: str, args: argparse.Namespace) -> list[dict]:
    port = str(free_port())
    procs = []
    for rank in range(args.ranks):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(args.ranks),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        cmd = [sys.executable, "-m", "benchmarks.data_scale", "--worker", mode, "--work", args.work]
        cmd += ["--num_proc", str(args.num_proc), "--batch_size", str(args.batch_size)]
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    results = []
    for proc in procs:
        output = proc.communicate()[0]
        lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"{mode} rank failed:\n{output[-3000:]}")
        results.append(json.loads(lines[0][len("RESULT ") :]))
    return results


def padding_fractions(n: int, micro_batch: int, global_batch: int, seed: int) -> dict[str, float]:
    """Padded / computed tokens of micro-batches, matched order vs grouped, on MMPR-like lengths."""
    from llava.train.sampling import grouped_order, matched_order

    rng = np.random.default_rng(seed)
    prompt = IMAGE_TOKENS + 30 + rng.integers(0, 60, n)
    replies = np.exp(rng.normal(4.2, 0.9, (n, 2))).clip(3, 1200).astype(int) * 4 // 3  # tokens ≈ 4/3 words
    lengths = prompt + replies.max(axis=1)
    ids = [f"s{i}" for i in range(n)]
    out = {}
    for name, order in (
        ("matched", matched_order(ids, 0, 0)),
        ("grouped", grouped_order(ids, lengths, 0, 0, global_batch)),
    ):
        batches = np.asarray(order[: n // micro_batch * micro_batch]).reshape(-1, micro_batch)
        computed = (lengths[batches].max(axis=1) * micro_batch).sum()
        out[name] = round(float(1 - lengths[batches].sum() / computed), 4)
    return out


def table(results: list[dict]) -> str:
    rows = ["| data layer | rank | s to first batch | peak RSS MB | RSS after imports MB | data RSS MB |"]
    rows.append("|---|---|---|---|---|---|")
    for r in results:
        data_rss = r["peak_rss_mb"] - r["rss_after_imports_mb"]
        rows.append(
            f"| {r['mode']} | {r['rank']} | {r['seconds_to_first_batch']} | {r['peak_rss_mb']} | "
            f"{r['rss_after_imports_mb']} | {data_rss:.0f} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_records", type=int, default=3_200_000)
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument(
        "--num_proc", type=int, default=os.cpu_count() or 1, help="validation workers (rank 0)"
    )
    parser.add_argument("--image_pool", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="200K records, 2 ranks")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument(
        "--work",
        default=None,
        help="work directory, kept; its data is reused if present (default: temporary)",
    )
    parser.add_argument("--json_out", default=None)
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.quick:
        args.num_records, args.ranks = 200_000, 2
    keep = args.work is not None
    args.work = args.work or tempfile.mkdtemp(prefix="data_scale_")
    work = Path(args.work)
    try:
        start = time.perf_counter()
        write_data(work, args.num_records, args.image_pool, seed=0)
        print(
            f"wrote {args.num_records} records in {time.perf_counter() - start:.1f} s to {work}", flush=True
        )
        print(f"settings: ranks={args.ranks} num_proc={args.num_proc} cpus={os.cpu_count()}", flush=True)
        results = []
        shutil.rmtree(work / "cache", ignore_errors=True)
        for mode in args.modes.split(","):
            results += run_mode(mode, args)
            print(table([r for r in results if r["mode"] == mode]).split("\n", 2)[2], flush=True)
        padding = padding_fractions(100_000, micro_batch=4, global_batch=256, seed=0)
        print(table(results))
        print(f"padding fraction (micro-batch 4, mega-batch 256, MMPR-like lengths): {padding}")
        if args.json_out:
            Path(args.json_out).write_text(
                json.dumps({"settings": vars(args), "results": results, "padding": padding})
            )
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
