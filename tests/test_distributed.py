"""Data-parallel training under `torchrun --nproc_per_node 2` (gloo, CPU) matches one process, and only rank 0 writes.

Each run costs two Python processes importing torch + transformers (~20-30 s on 2 busy cores).
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HELPER = str(Path(__file__).with_name("train_dist_tiny.py"))
ATOL = 1e-5  # AdamW at lr 1e-3 for 6 steps; measured max difference ~3e-6 (float sums in another order)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _single(out, log, *extra):
    subprocess.run([sys.executable, HELPER, str(out), str(log), *extra], check=True, timeout=300, env=_env(),
                   capture_output=True)


def _torchrun(out, log, *extra, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), HELPER, str(out), str(log), *extra]
    proc = subprocess.run(cmd, timeout=timeout, env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((log / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    _single(tmp / "single", tmp / "single_log")
    ranks = _torchrun(tmp / "dist", tmp / "dist_log")
    single = json.loads((tmp / "single_log" / "rank0.json").read_text())
    return tmp, single, ranks


def test_two_ranks_match_one_process(runs):
    tmp, single, ranks = runs
    assert [r["world"] for r in ranks] == [2, 2] and single["world"] == 1
    assert ranks[0]["steps"] == ranks[1]["steps"] == single["steps"] == 6
    ref = load_file(single["final"])
    sys.path.insert(0, str(Path(HELPER).parent))
    from train_dist_tiny import build

    init = build()[0].projector.state_dict()
    moved = max(float((ref[k] - init[k]).abs().max()) for k in ref)
    assert moved > 100 * ATOL  # training moved the weights far more than the tolerance
    for r in ranks:
        got = load_file(r["final"])
        assert set(got) == set(ref)
        for k in ref:
            assert torch.allclose(got[k], ref[k], rtol=0, atol=ATOL), (r["rank"], k, float((got[k] - ref[k]).abs().max()))
    # the global loss each rank reports equals the single process's loss; rank 0's best_val reaches rank 1
    for r in ranks:
        assert r["train_loss"] == pytest.approx(single["train_loss"], abs=1e-5)
        assert r["best_val"] == pytest.approx(single["best_val"], abs=1e-5)
    # rank 0's files are the same checkpoint a single process writes
    a, b = load_file(str(tmp / "single" / "checkpoint" / "model.safetensors")), load_file(str(tmp / "dist" / "checkpoint" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=ATOL) for k in a)


def test_only_rank0_writes(runs):
    tmp, single, ranks = runs
    rank0, rank1 = ranks[0]["writes"], ranks[1]["writes"]
    assert rank1 == [], f"rank 1 wrote under the output folder: {rank1[:5]}"
    # the recorder sees every kind of write (so the empty list above means something): the same ones as alone
    written = {Path(p).relative_to(tmp / "dist").as_posix() for _, p in rank0}
    for name in ["model.safetensors", "model.safetensors.tmp", "config.json", "curves.json", "curves.png",
                 "checkpoint/model.safetensors", "checkpoint/optimizer.safetensors", "checkpoint/trainer_state.json"]:
        assert name in written, name
    assert sorted(k for k, _ in rank0) == sorted(k for k, _ in single["writes"])


def test_time_budget_stops_every_rank_at_the_same_step(tmp_path):
    # rank 1 starts 4 s late, so by its own clock it is under the 3 s budget when rank 0 is over it; without
    # rank 0 deciding for all, rank 0 stops while rank 1 waits in the next all_reduce (a hang, or an error).
    ranks = _torchrun(tmp_path / "out", tmp_path / "log", "--steps", "30", "--stagger", "4", "--minutes", "0.05",
                      timeout=240)
    assert ranks[0]["steps"] == ranks[1]["steps"] < 30
    assert ranks[1]["writes"] == []


CONTRACT_HELPER = str(Path(__file__).with_name("train_dist_contract.py"))


def _contract_data(tmp: Path) -> list[str]:
    """A tiny backbone saved as a Hugging Face folder, 12 users' embeddings and 48 examples: `e2p train`'s inputs."""
    import numpy as np

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import make_backbone

    bb = make_backbone()
    bb.model.save_pretrained(tmp / "backbone")
    bb.tokenizer.save_pretrained(tmp / "backbone")
    users = [f"u{i}" for i in range(12)]
    np.savez(tmp / "users.npz", user=np.array(users), embedding=np.random.default_rng(0).normal(size=(12, 8)).astype("float32"))
    replies = ["i like dogs .", "i play guitar .", "i am a nurse .", "i love cats ."]
    with open(tmp / "examples.jsonl", "w") as f:
        for i, u in enumerate(users):
            for j in range(4):
                f.write(json.dumps({"user": u, "prompt": "tell me about yourself", "completion": replies[(i + j) % 4]}) + "\n")
    return ["train", "--backbone", str(tmp / "backbone"), "--users", str(tmp / "users.npz"), "--examples",
            str(tmp / "examples.jsonl"), "--steps", "8", "--batch-size", "4", "--dropout", "0", "--dtype", "float32",
            "--val-examples", "4", "--device", "cpu"]


def test_e2p_train_on_the_contract_under_torchrun_is_data_parallel(tmp_path):
    """`torchrun -m e2p.cli train --users U --examples E`: one process group, the same projector as one process,
    and only rank 0 writes the run folder."""
    argv = _contract_data(tmp_path)
    single = subprocess.run([sys.executable, CONTRACT_HELPER, str(tmp_path / "one"), str(tmp_path / "log-one"), "--", *argv],
                            env=_env(), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), CONTRACT_HELPER, str(tmp_path / "two"), str(tmp_path / "log-two"), "--", *argv]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / "log-two" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[1]["writes"] == [], ranks[1]["writes"][:5]
    assert ranks[0]["writes"]
    for part in ["model.safetensors", "shared_prefix/model.safetensors"]:
        a, b = load_file(str(tmp_path / "one" / part)), load_file(str(tmp_path / "two" / part))
        for k in a:
            assert torch.allclose(a[k], b[k], rtol=0, atol=1e-4), (part, k, float((a[k] - b[k]).abs().max()))
    one = json.loads((tmp_path / "one" / "training_report.json").read_text())
    two = json.loads((tmp_path / "two" / "training_report.json").read_text())
    assert one["stages"]["e2p"]["steps"] == two["stages"]["e2p"]["steps"] > 0
    assert two["verdict"]["text"]
