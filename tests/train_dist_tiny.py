"""Helper for test_distributed.py: a tiny training, alone or as one rank of `torchrun --nproc_per_node 2`.

    python tests/train_dist_tiny.py OUT LOGDIR --steps 6
    python -m torch.distributed.run --nproc_per_node 2 tests/train_dist_tiny.py OUT LOGDIR --steps 6

Same data, seed and global batch in both cases, dropout 0 (so splitting a batch changes nothing but the
order of float sums). Each process records every file-system write it makes under OUT (Python opens for
writing, renames, mkdirs, deletes via an audit hook, plus safetensors' native writes, which bypass Python)
and writes LOGDIR/rank{R}.json: the writes, its final projector tensors' file and its train losses.
--stagger S makes rank 1 start S seconds late; with --minutes it tests that a wall-clock budget stops
every rank at the same step.
"""
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from conftest import make_backbone  # noqa: E402

from e2p import Projector  # noqa: E402
from e2p.training.distributed import init_distributed  # noqa: E402
from e2p.model import E2PModel, new_config  # noqa: E402
from e2p.training.loop import TrainConfig, train_projector  # noqa: E402
from e2p.evaluate.scoring import Item

WRITES: list = []


def install_write_recorder(root: Path) -> None:
    """Record every write under `root` made by this process (audit hook + safetensors.torch.save_file)."""
    import safetensors.torch

    root_s = str(root.resolve())
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def under(path) -> bool:
        try:
            return isinstance(path, (str, bytes, os.PathLike)) and os.path.abspath(os.fsdecode(path)).startswith(root_s)
        except Exception:
            return False

    def hook(event, args):
        if event == "open" and under(args[0]):
            mode, flags = args[1], args[2]
            if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (mode is None and isinstance(flags, int) and flags & write_flags):
                WRITES.append(["open", os.fsdecode(args[0])])
        elif event in ("os.rename", "os.replace") and (under(args[0]) or under(args[1])):
            WRITES.append(["rename", os.fsdecode(args[1])])
        elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree") and under(args[0]):
            WRITES.append([event, os.fsdecode(args[0])])

    sys.addaudithook(hook)
    native = safetensors.torch.save_file

    def save_file(tensors, filename, *a, **kw):
        if under(filename):
            WRITES.append(["safetensors", str(filename)])
        return native(tensors, filename, *a, **kw)

    safetensors.torch.save_file = save_file  # e2p imports it at call time


def build():
    bb = make_backbone()
    torch.manual_seed(0)
    p = Projector(new_config(bb, embedding_dim=8, num_prefix_tokens=2, dropout=0.0))
    m = E2PModel(bb, p, autocast=False)
    replies = ["i like dogs .", "i play guitar .", "i am a nurse .", "i love cats .", "hi , i work as a teacher .",
               "music !", "i am fine , how are you ?", "just chatting ."]
    items = [Item(m.format("tell me about yourself", reply=r), i % 4) for i, r in enumerate(replies * 2)]
    table = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    return m, items, table


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("logdir", type=Path)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--stagger", type=float, default=0.0)
    ap.add_argument("--minutes", type=float, default=None)
    args = ap.parse_args()
    out, logdir, steps, stagger, minutes = args.out, args.logdir, args.steps, args.stagger, args.minutes
    rank, world = init_distributed(backend="gloo", timeout_s=120)
    install_write_recorder(out)
    m, items, table = build()
    if rank == 1 and stagger:
        time.sleep(stagger)
    cfg = TrainConfig(steps=steps, batch_size=4, lr=args.lr, eval_every=3, warmup_steps=2, contrastive_weight=0.5,
                      minutes=minutes)
    losses = []
    state = train_projector(m, items, table, out, cfg, val_items=items[:4], progress=False,
                            on_step=lambda s, l: (losses.append(l), time.sleep(0.5) if minutes else None))
    recording = list(WRITES)
    WRITES.clear()
    logdir.mkdir(parents=True, exist_ok=True)
    final = logdir / f"final_rank{rank}.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in m.projector.state_dict().items()}, str(final))
    (logdir / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "world": world, "writes": recording, "train_loss": losses, "steps": state["step"],
        "best_val": state["best_val"], "final": str(final)}))
    if world > 1:
        torch.distributed.destroy_process_group()
