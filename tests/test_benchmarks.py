"""The benchmarks run on the CPU with a tiny model, so they keep working between GPU sessions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_throughput_runs_our_step_and_the_references_and_prints_json_lines(tmp_path):
    result = subprocess.run(
        [sys.executable, "benchmarks/throughput.py", "recipes/demo.yaml", "model.name=vit_mu8", "data.batch_size=16",
         "data.workers=2", "--images", "48", "--steps", "2", "--warmup", "1", "--compare", "timm", "hf",
         "--loss-check", "3", "--profile", str(tmp_path / "profile")],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    runs = {(r["run"], r.get("data")): r for r in lines}
    assert set(runs) == {("matmul", None), ("ours", "synthetic"), ("ours", "shards"), ("timm", "synthetic"),
                         ("hf", "synthetic"), ("summary", None), ("loss_check", None)}
    assert runs[("matmul", None)]["tflops"] > 0
    for key in [("ours", "synthetic"), ("ours", "shards"), ("timm", "synthetic"), ("hf", "synthetic")]:
        r = runs[key]
        assert r["img_per_s"] > 0 and r["tflops"] > 0 and 0 < r["mfu"] < 1.5, r
        assert r["model"] == "vit_mu8" and r["batch"] == 16
    assert 0 <= runs[("ours", "shards")]["data_wait"] < 1
    assert runs[("summary", None)]["vs_timm"] > 0 and runs[("summary", None)]["vs_hf"] > 0
    per_image = {k: runs[k]["tflops"] / runs[k]["img_per_s"] for k in [("ours", "synthetic"), ("timm", "synthetic"),
                                                                     ("hf", "synthetic")]}
    assert max(per_image.values()) / min(per_image.values()) < 1.01, per_image  # one model, counted alike
    check = runs[("loss_check", None)]
    assert check["steps"] == 3 and check["relative_difference"] < 1e-4 and 3 < check["loss"] < 5  # ln(50 classes)
    for data in ("synthetic", "shards"):  # the kernel tables of 3 more steps, the matmuls among them
        table = (tmp_path / "profile" / f"ours-{data}.txt").read_text()
        assert "aten::addmm" in table and "Self CPU time total" in table


def test_throughput_on_synthetic_data_alone_generates_one_batch_of_images_not_thousands():
    result = subprocess.run(
        [sys.executable, "benchmarks/throughput.py", "recipes/demo.yaml", "model.name=vit_mu8", "data.batch_size=16",
         "data.workers=2", "--data", "synthetic", "--steps", "1", "--warmup", "1", "--compare"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wrote 1 shard (0 kept from an earlier run), 50 samples" in result.stdout, result.stdout[-2000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [(r["run"], r.get("data"), r["classes"]) for r in lines] == [("matmul", None, 50), ("ours", "synthetic", 50)]


def test_throughput_says_what_is_wrong_with_its_arguments_in_one_sentence():
    result = subprocess.run([sys.executable, "benchmarks/throughput.py", "recipes/demo.yaml", "optim.lrr=1"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "did you mean 'optim.lr'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_decode_throughput_times_both_paths():
    result = subprocess.run(
        [sys.executable, "benchmarks/decode_throughput.py", "--images", "12", "--batch", "6", "--repeats", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["run"] for r in lines] == ["host", "device_decode_jpeg", "device_views"]
    assert all(r["img_per_s"] > 0 and r["device"] == "cpu" for r in lines)


def test_block_bytes_counts_less_for_a_bf16_residual_stream():
    result = subprocess.run([sys.executable, "benchmarks/block_bytes.py", "--model", "vit_ti16", "--batch", "2"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    fp32, bf16 = (json.loads(line) for line in result.stdout.splitlines())
    assert (fp32["residual"], bf16["residual"]) == ("float32", "bfloat16")
    assert fp32["extern_bytes_per_token"] == bf16["extern_bytes_per_token"] > 0  # the same matmuls and attention
    assert 0 < bf16["fused_bytes_per_token"] < 0.9 * fp32["fused_bytes_per_token"]


def test_throughput_runs_the_deepspeed_backend_several_times_in_one_process():
    """DeepSpeed keeps the first process group it sees: every run of the benchmark (both data modes, the loss
    check) shares it."""
    pytest.importorskip("deepspeed")
    result = subprocess.run(
        [sys.executable, "benchmarks/throughput.py", "recipes/demo.yaml", "model.name=vit_mu8", "data.batch_size=16",
         "data.workers=2", "backend=deepspeed", "deepspeed.zero_stage=1", "--images", "48", "--steps", "2",
         "--warmup", "1", "--compare", "--loss-check", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    ours = [r for r in lines if r["run"] == "ours"]
    assert [r["data"] for r in ours] == ["synthetic", "shards"]
    assert all(r["backend"] == "deepspeed" and r["zero_stage"] == 1 and r["img_per_s"] > 0 for r in ours)
    assert [r["relative_difference"] for r in lines if r["run"] == "loss_check"] == [0.0]
