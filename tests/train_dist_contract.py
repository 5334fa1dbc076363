"""Helper for test_distributed.py: `e2p train --users --examples` as one process or as one rank of torchrun.

    python tests/train_dist_contract.py OUT LOGDIR -- e2p train arguments...

Records every file-system write this process makes under OUT (train_dist_tiny's recorder) and writes
LOGDIR/rank{R}.json with them and the process group's size.
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from train_dist_tiny import WRITES, install_write_recorder  # noqa: E402

if __name__ == "__main__":
    out, logdir, argv = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[4:]
    install_write_recorder(out)
    from e2p.cli import main

    code = main(argv + ["--out", str(out)])
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    logdir.mkdir(parents=True, exist_ok=True)
    (logdir / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "world": world, "writes": list(WRITES), "code": code}))
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(code)
