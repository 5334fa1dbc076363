import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

HELPER = str(Path(__file__).with_name("train_tiny.py"))


def _run(out, steps, delay=0.0, resume=False):
    return subprocess.Popen([sys.executable, HELPER, str(out), str(steps), str(delay), "resume" if resume else "fresh"])


def test_train_writes_best_checkpoint_and_curves(tmp_path):
    assert _run(tmp_path / "a", 6).wait(timeout=300) == 0
    out = tmp_path / "a"
    for name in ["config.json", "model.safetensors", "curves.json", "curves.png", "checkpoint/optimizer.safetensors",
                 "checkpoint/trainer_state.json"]:
        assert (out / name).is_file(), name
    curves = json.loads((out / "curves.json").read_text())
    assert len(curves["train_loss"]) == 6 and curves["val_step"] == [0, 2, 4, 6]
    assert curves["val_loss"][-1] < curves["val_loss"][0]  # it learns


def test_killed_run_resumes_to_the_same_result(tmp_path):
    assert _run(tmp_path / "full", 8).wait(timeout=300) == 0
    proc = _run(tmp_path / "cut", 8, delay=1.0)
    state = tmp_path / "cut" / "checkpoint" / "trainer_state.json"
    deadline = time.time() + 240
    while time.time() < deadline and not (state.is_file() and json.loads(state.read_text())["step"] >= 2):
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    step_at_kill = json.loads(state.read_text())["step"]
    assert 2 <= step_at_kill < 8
    assert _run(tmp_path / "cut", 8, resume=True).wait(timeout=300) == 0
    assert json.loads(state.read_text())["step"] == 8
    a = load_file(str(tmp_path / "full" / "checkpoint" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "checkpoint" / "model.safetensors"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
