"""Distillation (research/persona/recipe.py) from a teacher that reads the persona text into a projector that only
sees the embedding, through the training loop's public `objective` hook."""
import dataclasses

import pytest
import torch

from e2p import Projector
from e2p.model import E2PModel, new_config
from e2p.training.loop import TrainConfig, train_projector
from research.persona.recipe import TeacherItem, distill_objective
from research.persona.recipe import distill_sums as _distill_sums

PERSONAS = ["i like dogs", "i play guitar", "i am a nurse", "i love cats"]
REPLIES = ["dogs are great .", "music is my life .", "i work at night .", "my cat sleeps a lot ."]


def _setup(tiny, teacher_shift=0.0):
    torch.manual_seed(0)
    shared = Projector(new_config(tiny, embedding_dim=0, num_prefix_tokens=1))
    t_proj = Projector(new_config(tiny, embedding_dim=0, num_prefix_tokens=1))
    t_proj.shared.data.copy_(shared.shared.data + teacher_shift * torch.randn_like(shared.shared))
    teacher = E2PModel(tiny, t_proj.eval(), autocast=False)
    student_p = Projector(new_config(tiny, embedding_dim=8, num_prefix_tokens=1, dropout=0.0))
    student_p.shared.data.copy_(shared.shared.data)
    student = E2PModel(tiny, student_p, autocast=False)
    items = [TeacherItem(student.format("hi", reply=r), i, teacher_row=teacher.format("hi", reply=r, persona_text=p))
             for i, (p, r) in enumerate(zip(PERSONAS, REPLIES))]
    table = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    return teacher, student, items, table


def test_kl_is_zero_when_the_student_sees_what_the_teacher_sees(tiny):
    teacher, student, items, table = _setup(tiny)
    student.projector.eval()
    rows = [it.teacher_row for it in items]  # same rows, person part starts at zero -> same prefix
    sums, counts, kls = _distill_sums(student, teacher, rows, rows, table)
    assert counts.min() > 0
    assert kls.abs().max() < 1e-5
    nll, _ = student.loss(rows, table, reduction="none")
    assert torch.allclose(sums, nll, atol=1e-4)


def test_distillation_moves_the_student_toward_the_teacher(tiny, tmp_path):
    teacher, student, items, table = _setup(tiny, teacher_shift=3.0)  # a teacher the student must move to
    before = _distill_sums(student, teacher, [it.row for it in items], [it.teacher_row for it in items], table)[2].sum()
    cfg = TrainConfig(steps=30, batch_size=4, lr=1e-2, eval_every=100, warmup_steps=1, freeze_shared=True)
    train_projector(student, items, table, tmp_path, cfg, progress=False, objective=distill_objective(teacher, 1.0))
    student.projector.eval()
    after = _distill_sums(student, teacher, [it.row for it in items], [it.teacher_row for it in items], table)[2].sum()
    assert after < 0.7 * before, (before, after)


def test_mismatched_targets_and_missing_teacher_rows_are_refused(tiny):
    teacher, student, items, table = _setup(tiny)
    wrong = [teacher.format("hi", reply=r + " extra words", persona_text="x") for r in REPLIES]
    with pytest.raises(ValueError, match="same target tokens"):
        _distill_sums(student, teacher, [it.row for it in items], wrong, table)
    with pytest.raises(ValueError, match="teacher_row"):
        _distill_sums(student, teacher, [it.row for it in items], [None] * 4, table)


def test_the_product_knows_nothing_of_distillation():
    """Distillation is research: the product's config, items and loop carry no teacher."""
    import inspect

    from e2p.evaluate.scoring import Item

    assert "distill_weight" not in {f.name for f in dataclasses.fields(TrainConfig)}
    assert {f.name for f in dataclasses.fields(Item)} == {"row", "person"}
    assert "teacher" not in inspect.signature(train_projector).parameters


def test_the_default_objective_is_the_products_loss(tiny, tmp_path):
    """`objective=None` trains exactly as `objective=nll_objective`, and a custom objective is what the loop minimises."""
    from e2p.training.loop import nll_objective

    _, student, items, table = _setup(tiny)
    start = {k: v.clone() for k, v in student.projector.state_dict().items()}
    cfg = TrainConfig(steps=3, batch_size=2, lr=1e-2, eval_every=100, warmup_steps=1)
    finals, calls = [], []

    def counting(model, batch, emb):
        calls.append(len(batch))
        return nll_objective(model, batch, emb)

    for i, objective in enumerate([None, counting]):
        student.projector.load_state_dict(start)
        train_projector(student, items, table, tmp_path / str(i), cfg, progress=False, objective=objective)
        finals.append({k: v.clone() for k, v in student.projector.state_dict().items()})
    assert calls == [2, 2, 2]  # every step, with this process's rows of the batch
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])
    assert any(not torch.equal(finals[0][k], start[k]) for k in start)
