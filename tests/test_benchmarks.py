"""Smoke test of benchmarks/run_all.py on the tiny random model (figures are meaningless, the plumbing is not)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

RUN_ALL = Path(__file__).resolve().parents[1] / "benchmarks" / "run_all.py"
RATIOS = ["e2p_vs_plain_tokens_per_s", "batched_vs_sequential_throughput", "train_step_speedup_vs_naive",
          "ttft_e2p_vs_text"]


def test_run_all_tiny_quick(tmp_path):
    out = tmp_path / "results.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(RUN_ALL), "--tiny", "--quick", "--out", str(out)], env=env,
                          timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    for key in RATIOS:
        assert isinstance(report[key], float) and report[key] > 0, key
    assert report["bytes_per_user"]["e2p_embedding"] == 384 * 4
    assert report["bytes_per_user"]["lora_rank8_q_v"] > report["bytes_per_user"]["e2p_embedding"]
    assert report["results"]["cost"]["lora"]["formula_matches_peft"] in (True, None)
    assert report["results"]["train_step"]["loss"]["identical_within_1e-4"]
    assert report["mode"] == {"quick": True, "tiny": True, "warning": report["mode"]["warning"]}
    assert report["settings"]["generation"]["repeats"] >= 1
    assert (tmp_path / "scaling_tiny.png").stat().st_size > 0
