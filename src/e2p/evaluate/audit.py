"""`e2p audit`: what a trained projector gives away about people, measured.

Membership inference: can an attacker who can score text under the projector tell the users it was trained on
from users it never saw? Two loss-threshold attacks on each user's mean per-token loss of their own examples:
  loss        score = -loss_e2p (trained users should fit better)
  calibrated  score = -(loss_e2p - loss_shared_prefix): the user's loss relative to the style-only prefix, which
              removes how easy a user's text is for everyone (a stronger attack, after Carlini et al.'s
              reference-model calibration)
Each is reported as an AUC (0.5: the attacker cannot tell) with a 95% interval from a bootstrap over users.

What replies reveal: greedy replies of N candidate users, and how often a reply is closer (text-encoder cosine) to
its own user's other targets than to any other candidate's (the evaluation loop's identification), against
chance 1 / N, for users never trained on and for training users.
"""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np

from ..config import E2PConfig, resolve_projector
from ..data.contract import Example, UserTable
from ..errors import E2PError
from ..config import SPLIT_FILE
from .compare import auc, auc_interval, roc_curve
from .loop import Condition, _interleave_users, generation_metrics, run_conditions

log = logging.getLogger(__name__)


def training_users(projector_dir: str | Path, train_users: str | Path | None = None) -> set[str]:
    """The users a projector was trained on: `train_users` (one id per line, a JSON list, or a split.json), else
    the `split.json` that `e2p train` wrote beside the projector."""
    path = Path(train_users) if train_users else Path(projector_dir) / SPLIT_FILE
    if not path.is_file():
        raise E2PError(f"no list of training users at {path}: give --train-users FILE (one user id per line) or "
                       f"the run folder `e2p train` wrote (it holds {SPLIT_FILE})")
    text = path.read_text()
    try:
        data = json.loads(text)
    except ValueError:
        return {line.strip() for line in text.splitlines() if line.strip()}
    if isinstance(data, dict):
        data = data.get("train")
    if not isinstance(data, list):
        raise E2PError(f"{path}: expected a JSON list of user ids or an object with a `train` list")
    return {str(u) for u in data}


def per_user_loss(nll: np.ndarray, counts: np.ndarray, people: list[str]) -> dict[str, float]:
    """Each user's mean loss per target token over their scored examples."""
    s: dict[str, float] = {}
    c: dict[str, float] = {}
    for x, n, u in zip(nll, counts, people):
        s[u] = s.get(u, 0.0) + float(x)
        c[u] = c.get(u, 0.0) + float(n)
    return {u: s[u] / max(c[u], 1.0) for u in s}


def _attack(scores: dict[str, float], members: set[str], seed: int) -> dict:
    m = [v for u, v in scores.items() if u in members]
    n = [v for u, v in scores.items() if u not in members]
    fpr, tpr = roc_curve(m, n)
    low = tpr[fpr <= 0.1].max() if (fpr <= 0.1).any() else 0.0
    return {"auc": auc(m, n), "ci95": list(auc_interval(m, n, seed=seed)), "tpr_at_fpr_0.1": float(low),
            "members": len(m), "nonmembers": len(n), "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()}}


def _cap(examples: list[Example], per_user: int, max_users: int | None, members: set[str], seed: int) -> list[Example]:
    rng = random.Random(seed)
    by_user: dict[str, list[Example]] = {}
    for ex in examples:
        by_user.setdefault(ex.user, []).append(ex)
    keep: set[str] = set()
    for group in (sorted(u for u in by_user if u in members), sorted(u for u in by_user if u not in members)):
        keep |= set(group if max_users is None or len(group) <= max_users else rng.sample(group, max_users))
    out = []
    for u in sorted(keep):
        exs = by_user[u]
        out += exs if len(exs) <= per_user else rng.sample(exs, per_user)
    return out


def audit_projector(backbone, users: UserTable, examples: list[Example], projector_dir: str | Path,
                    out_dir: str | Path | None = None, *, train_users: str | Path | None = None,
                    examples_per_user: int = 8, max_users: int | None = 200, candidates: int = 20,
                    encoder=None, batch_size: int = 16, seed: int = 0, progress: bool = True) -> dict:
    """Membership inference (loss and calibrated attacks, AUC with intervals over users) and identification of
    greedy replies among `candidates` users (0: skip), for the projector folder `e2p train` wrote. Writes
    results.json, REPORT.md and audit.png to `out_dir` when given. `encoder`: for identification (default the
    bundled all-MiniLM-L6-v2)."""
    projector_dir = resolve_projector(projector_dir)
    members = training_users(projector_dir, train_users)
    present = {ex.user for ex in examples}
    if not present & members or not present - members:
        raise E2PError(f"the audit needs examples of both training users and unseen users: of {len(present)} users in "
                       f"the examples, {len(present & members)} were trained on; give the examples file the run was "
                       "trained on (it holds both), or add unseen users' examples")
    config = E2PConfig.load(projector_dir)
    conds = [c for c in (Condition("shared_prefix", projector_dir / "shared_prefix"),
                         Condition("e2p", projector_dir, embeddings="own"))
             if (c.projector_dir / "config.json").is_file()]
    scored = _cap(examples, examples_per_user, max_users, members, seed)
    s = run_conditions(backbone, conds, scored, users, plain_config=config, max_target_tokens=config.max_target_tokens,
                       batch_size=batch_size, seed=seed, progress=progress)
    people = [ex.user for ex in scored]
    loss = {name: per_user_loss(v, s["counts"], people) for name, v in s["nll"].items()}
    attacks = {"loss": _attack({u: -v for u, v in loss["e2p"].items()}, members, seed)}
    if "shared_prefix" in loss:
        attacks["calibrated"] = _attack({u: -(v - loss["shared_prefix"][u]) for u, v in loss["e2p"].items()}, members, seed)
    results = {"projector": str(projector_dir), "privacy": _privacy_of(projector_dir),
               "membership": {"users": {"members": sum(u in members for u in loss["e2p"]),
                                        "nonmembers": sum(u not in members for u in loss["e2p"])},
                              "examples_per_user": examples_per_user, "attacks": attacks,
                              "mean_loss": {name: {"members": _mean(v, members, True), "nonmembers": _mean(v, members, False)}
                                            for name, v in loss.items()}},
               "identification": {}}
    if candidates > 0:
        if encoder is None:
            from ..data.encoders import TextEncoder

            encoder = TextEncoder()
        for group, inside in (("unseen", False), ("training", True)):
            results["identification"][group] = _identify(backbone, conds, examples, users, config, members, inside,
                                                         candidates, encoder, batch_size, seed, progress)
    if out_dir is not None:
        write_audit(results, Path(out_dir))
    return results


def _mean(v: dict[str, float], members: set[str], inside: bool) -> float | None:
    xs = [x for u, x in v.items() if (u in members) == inside]
    return float(np.mean(xs)) if xs else None


def _privacy_of(projector_dir: Path) -> dict | None:
    report = projector_dir / "training_report.json"
    if not report.is_file():
        return None
    p = json.loads(report.read_text()).get("privacy")
    return None if p is None else {"epsilon": p["epsilon"], "delta": p["delta"]}


def _identify(backbone, conds, examples, users, config, members, inside: bool, candidates: int, encoder,
              batch_size: int, seed: int, progress: bool) -> dict:
    pool = sorted({ex.user for ex in examples if (ex.user in members) == inside})
    chosen = set(pool if len(pool) <= candidates else random.Random(seed).sample(pool, candidates))
    exs = _interleave_users([ex for ex in examples if ex.user in chosen], seed)  # first round: one example per user
    s = run_conditions(backbone, conds, exs, users, plain_config=config, max_target_tokens=config.max_target_tokens,
                       batch_size=batch_size, generate=len(chosen), seed=seed, progress=progress)
    m = generation_metrics(s["generations"], exs, encoder)
    info = m.get("_identification") or {"users": len(chosen), "chance": 1 / max(len(chosen), 1), "generations": 0}
    return {"candidates": info["users"], "chance": info["chance"], "replies": info["generations"],
            "accuracy": {name: m[name].get("identification") for name in s["generations"]},
            "accuracy_style": {name: m[name].get("identification_style") for name in s["generations"]}}


def report_markdown(r: dict) -> str:
    mem = r["membership"]
    priv = r.get("privacy")
    lines = ["# E2P privacy audit", "",
             f"Projector `{r['projector']}`: " + (f"trained with differential privacy per user, (epsilon {priv['epsilon']:.3g}, "
                                                   f"delta {priv['delta']:.3g})." if priv else "trained without differential privacy."),
             "", "## Membership inference", "",
             f"{mem['users']['members']} training users against {mem['users']['nonmembers']} users never trained on, each "
             f"scored by the mean per-token loss of up to {mem['examples_per_user']} of their examples. AUC 0.5: the "
             "attacker cannot tell them apart; 1: always can.", "",
             "| attack | AUC | 95% interval (users) | TPR at 10% FPR |", "|---|---|---|---|"]
    names = {"loss": "loss (-loss_e2p)", "calibrated": "calibrated (-(loss_e2p - loss_shared_prefix))"}
    for k, a in mem["attacks"].items():
        lines.append(f"| {names[k]} | {a['auc']:.3f} | [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}] | {a['tpr_at_fpr_0.1']:.3f} |")
    lines += ["", "Mean per-token loss: " + "; ".join(
        f"{n} members {v['members']:.4f}, non-members {v['nonmembers']:.4f}" for n, v in mem["mean_loss"].items()
        if v["members"] is not None and v["nonmembers"] is not None) + "."]
    if r["identification"]:
        lines += ["", "## What replies reveal", "",
                  "Share of greedy replies closer (text-encoder cosine) to their own user's other targets than to each "
                  "other candidate's: an attacker who sees a reply picks its author among N candidates; by text and "
                  "style, the same with the reply's writing style joined to the text vector.", "",
                  "| candidates | N | chance | e2p | shared_prefix | e2p (text+style) | shared_prefix (text+style) |",
                  "|---|---|---|---|---|---|---|"]
        f = lambda x: "-" if x is None else f"{x:.3f}"
        for group, v in r["identification"].items():
            style = v.get("accuracy_style", {})
            lines.append(f"| {group} users | {v['candidates']} | {v['chance']:.3f} | {f(v['accuracy'].get('e2p'))} | "
                         f"{f(v['accuracy'].get('shared_prefix'))} | {f(style.get('e2p'))} | {f(style.get('shared_prefix'))} |")
    return "\n".join(lines) + "\n"


def plot_audit(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if r["identification"] else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.5), squeeze=False)
    ax = axes[0, 0]
    for name, a in r["membership"]["attacks"].items():
        ax.plot(a["roc"]["fpr"], a["roc"]["tpr"], label=f"{name}: AUC {a['auc']:.2f} [{a['ci95'][0]:.2f}, {a['ci95'][1]:.2f}]")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="chance")
    ax.set_xlabel("false positive rate (unseen users called members)")
    ax.set_ylabel("true positive rate (training users found)")
    ax.set_title("membership inference")
    ax.legend(fontsize=8)
    if panels == 2:
        ax = axes[0, 1]
        groups = list(r["identification"])
        conds = sorted({c for v in r["identification"].values() for c in v["accuracy"]})
        width = 0.8 / max(len(conds), 1)
        for j, c in enumerate(conds):
            vals = [r["identification"][g]["accuracy"].get(c) or 0.0 for g in groups]
            ax.bar(np.arange(len(groups)) + j * width, vals, width, label=c)
        for i, g in enumerate(groups):
            ax.hlines(r["identification"][g]["chance"], i - 0.1, i + 0.8, colors="k", linestyles="--", lw=1)
        ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, [f"{g} users" for g in groups])
        ax.set_ylabel("identification accuracy (dashed: chance)")
        ax.set_title("replies picked out among N candidates")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_audit(results: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    (out_dir / "REPORT.md").write_text(report_markdown(results))
    plot_audit(results, out_dir / "audit.png")
