"""Helper run as a subprocess by test_train.py: trains a tiny projector (optionally slowly, to be killed)."""
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from conftest import make_backbone  # noqa: E402

from e2p import Projector  # noqa: E402
from e2p.model import E2PModel, new_config  # noqa: E402
from e2p.training.loop import TrainConfig, train_projector  # noqa: E402
from e2p.evaluate.scoring import Item


def build():
    bb = make_backbone()
    torch.manual_seed(0)
    p = Projector(new_config(bb, embedding_dim=8, num_prefix_tokens=1))
    m = E2PModel(bb, p, autocast=False)
    replies = ["i like dogs .", "i play guitar .", "i am a nurse .", "i love cats ."]
    items = [Item(m.format("tell me about yourself", reply=r), i % 4) for i, r in enumerate(replies * 4)]
    table = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    return m, items, table


if __name__ == "__main__":
    out, steps, delay, resume = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "resume"
    m, items, table = build()
    cfg = TrainConfig(steps=steps, batch_size=4, lr=1e-2, eval_every=2, warmup_steps=2, contrastive_weight=0.5)
    train_projector(m, items, table, out, cfg, val_items=items[:4], resume=resume, progress=False,
                    on_step=lambda s, l: time.sleep(delay))
