"""bench/gpu_check.py: the CPU rehearsal runs every code path of the GPU call, and its output can never pass for a
GPU figure (marked dry_run / cpu, never written over bench/results; without a GPU and --dry-run the script refuses)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_check.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def run(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=ENV, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


@pytest.mark.slow
def test_dry_run_exercises_both_parts_and_marks_its_json(tmp_path):
    proc = run("--dry-run", "--out-dir", str(tmp_path), timeout=240)  # ~30 s on 2 idle cores
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    latency = json.loads((tmp_path / "gpu_latency.json").read_text())
    mfu = json.loads((tmp_path / "mfu.json").read_text())
    for result in (latency, mfu):
        assert result["dry_run"] is True and result["device"] == "cpu" and result["gpu"] is None

    for key in ("paper_chunk_ms_p50", "paper_chunk_ms_p99", "paper_chunk_ms_p50_ctx72", "paper_chunk_ms_p99_ctx72",
                "alg1_chunk_ms_p50", "split_ms_p50", "split_ms_p50_ctx72", "attention_kernels", "torch_compile",
                "cuda_graphs", "headline_variant", "torch", "sampler"):
        assert key in latency, key
    assert set(latency["split_ms_p50"]) == {"cache_update", "fdm", "video", "action"}
    assert latency["meets_goal"] is False  # a rehearsal never meets a GPU goal
    assert latency["torch_compile"] is (latency["headline_variant"] == "compile")
    assert latency["sampler"] == {"video_steps": 3, "video_s_end": 0.6, "video_cfg": 5.0, "action_steps": 10,
                                  "action_cfg": 1.0}
    for name, variant in latency["variants"].items():
        assert variant["status"] == "done", (name, variant)
        for ctx in ("ctx24", "ctx72"):
            assert variant[ctx]["n"] >= 1 and variant[ctx]["chunk_ms_p50"] > 0, (name, ctx)
        assert variant["attention_kernels"], name  # the profiler named the attention kernel that ran
    assert latency["variants"]["eager"]["ctx72"]["context_frames"] == 72

    expected = {"deepspeed-compile", "deepspeed-compile-tuned", "deepspeed-eager", "torch-compile", "torch-eager"}
    assert set(mfu["variants"]) == expected | {"deepspeed"}
    for name, variant in mfu["variants"].items():
        assert "mfu" in variant and "step_s" in variant, (name, variant)
    assert mfu["variants"]["deepspeed"]["variant"].startswith("deepspeed-")
    assert mfu["variants"]["deepspeed"]["meets_goal"] is False
    assert mfu["variants"]["deepspeed-eager"]["profile_top"]
    assert "flops" in mfu and mfu["flops"]["step_flops"] > 0
    assert "== deepspeed-eager" in (tmp_path / "gpu_check_profile.txt").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_without_a_gpu_it_refuses_instead_of_writing_a_figure():
    proc = run(timeout=120)
    assert proc.returncode != 0 and "no CUDA GPU" in proc.stderr


def test_a_dry_run_never_writes_over_the_committed_results():
    before = {p.name: p.stat().st_mtime for p in (REPO / "bench" / "results").glob("*.json")}
    proc = run("--dry-run", "--out-dir", str(REPO / "bench" / "results"), timeout=120)
    assert proc.returncode != 0 and "never writes over bench/results" in proc.stderr
    assert before == {p.name: p.stat().st_mtime for p in (REPO / "bench" / "results").glob("*.json")}
