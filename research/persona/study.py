"""The persona study's own parts, each a list of conditions for the one evaluation loop (`e2p.evaluate`):

    python research/persona/study.py --data ../shared/data --projector persona-deep-k1 --out runs/persona-study \
        [--k-runs runs/k2,runs/k4] [--limit 160] [--noise 0.1,0.3,1.0]

- the standard conditions (none, text, shared_prefix, shuffled, e2p, and the text ones where trained) on unseen
  Synthetic-Persona-Chat test people;
- embedding drift: e2p with each person's embedding plus Gaussian noise of a given share of its norm
  (`e2p_noise<level>`, a second table for the same people);
- prefix length k: the shared prefix, shuffled and e2p of projectors trained with other k (`e2p train --data ...
  --prefix-tokens K --out runs/kK`), on the same examples;
- MSC refresh (where the data has MSC session files): the same person's initial persona embedding vs the persona
  refreshed after earlier sessions, on their later replies (`msc-<file>/`).
Everything else (scoring, intervals, generations, identification, report, plot) is the loop's.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np

from e2p import E2PConfig, TextEncoder, load_backbone
from e2p.config import resolve_projector
from e2p.data.contract import UserTable
from e2p.data.persona import LoadReport, load_msc, load_persona, person_id
from e2p.data.persona_contract import persona_contract
from e2p.data.encoders import encoder_for
from e2p.evaluate import Condition, conditions_for, evaluate_examples


def add_noise(vectors: np.ndarray, level: float, seed: int) -> np.ndarray:
    """Each row plus Gaussian noise whose norm is `level` x the row's norm (fixed by the seed)."""
    if level == 0:
        return vectors.copy()
    g = np.random.default_rng(seed).standard_normal(vectors.shape).astype(np.float32)
    g /= np.maximum(np.linalg.norm(g, axis=-1, keepdims=True), 1e-12)
    return vectors + level * np.linalg.norm(vectors, axis=-1, keepdims=True) * g


def msc_session_files(data: Path) -> list[Path]:
    """MSC files of sessions 2+ (their lines carry both `personas` and `init_personas`)."""
    files = [data] if data.is_file() else sorted(p for p in data.rglob("*") if p.is_file() and p.name.lower().startswith("msc"))
    out = []
    for p in files:
        try:
            with p.open(encoding="utf-8", errors="replace") as f:
                first = json.loads(f.readline())
        except (ValueError, OSError):
            continue
        if isinstance(first, dict) and "init_personas" in first and "personas" in first:
            out.append(p)
    return out


def msc_initial(path: Path) -> dict[str, str]:
    """person id (from the initial persona) -> initial persona text."""
    out = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            init = json.loads(line).get("init_personas")
        except (ValueError, AttributeError):
            continue
        for p in init or []:
            if p:
                out.setdefault(person_id(p), " ".join(p))
    return out


def run_persona_study(backbone, encoder, data: str | Path, projector: str | Path, out: str | Path, *, limit: int = 160,
                      noise: tuple[float, ...] = (0.1, 0.3, 1.0), k_runs: tuple[str, ...] = (), msc_limit: int = 120,
                      generate: int = 48, seed: int = 0, progress: bool = True) -> dict:
    data, out, projector = Path(data), Path(out), resolve_projector(projector)
    config = E2PConfig.load(projector)
    embed = encoder_for(config, encoder)
    test = load_persona(data, "test" if data.is_dir() else "all")
    test = random.Random(seed).sample(test, limit) if limit and limit < len(test) else test
    users, examples = persona_contract(test, embed, config.history_turns)
    conds = conditions_for(projector, with_text=True)
    pairs = [("e2p", "shared_prefix"), ("e2p", "shuffled"), ("e2p", "none"), ("text", "none"),
             ("e2p_text", "shared_prefix_text")]
    for level in noise:
        noisy = UserTable(users.ids, add_noise(users.vectors, level, seed), f"noise {level}")
        conds.append(Condition(f"e2p_noise{level}", projector, embeddings="own", users=noisy))
        pairs.append((f"e2p_noise{level}", "e2p"))
    for run in k_runs:
        k = E2PConfig.load(run).num_prefix_tokens
        conds += [Condition(f"shared_prefix_k{k}", Path(run) / "shared_prefix"),
                  Condition(f"shuffled_k{k}", Path(run), embeddings="shuffled"),
                  Condition(f"e2p_k{k}", Path(run), embeddings="own")]
        pairs += [(f"e2p_k{k}", f"shared_prefix_k{k}"), (f"e2p_k{k}", f"shuffled_k{k}")]
    results = {"main": evaluate_examples(backbone, users, examples, projector, out, conditions=conds, generate=generate,
                                         seed=seed, encoder=encoder, pairs=pairs, progress=progress)}
    for path in msc_session_files(data):
        initial = msc_initial(path)
        msc = [e for e in load_msc(path, LoadReport()) if e.person_id in initial]
        if len({e.person_id for e in msc}) < 2:
            continue
        msc = random.Random(seed).sample(msc, min(msc_limit, len(msc)))
        refreshed, msc_examples = persona_contract(msc, embed, config.history_turns)
        first = UserTable(refreshed.ids, np.asarray(embed.encode([initial[u] for u in refreshed.ids]), np.float32), "initial")
        msc_conds = [Condition("none", None), Condition("shared_prefix", projector / "shared_prefix"),
                     Condition("e2p_initial", projector, embeddings="own", users=first),
                     Condition("e2p_refreshed", projector, embeddings="own"),
                     Condition("e2p_shuffled", projector, embeddings="shuffled")]
        msc_conds = [c for c in msc_conds if c.projector_dir is None or (c.projector_dir / "config.json").is_file()]
        r = evaluate_examples(backbone, refreshed, msc_examples, projector, out / f"msc-{path.stem}", conditions=msc_conds,
                              generate=0, seed=seed, encoder=False, progress=progress,
                              pairs=[("e2p_refreshed", "e2p_initial"), ("e2p_refreshed", "shared_prefix")])
        cos = np.sum(first.vectors * refreshed.vectors, 1) / (np.linalg.norm(first.vectors, axis=1) *
                                                             np.linalg.norm(refreshed.vectors, axis=1))
        r["cosine_initial_vs_refreshed"] = float(cos.mean())
        results[f"msc-{path.stem}"] = r
    (out / "study.json").write_text(json.dumps({k: {"conditions": v["conditions"], "comparisons": v["comparisons"],
                                                    **({"cosine_initial_vs_refreshed": v["cosine_initial_vs_refreshed"]}
                                                       if "cosine_initial_vs_refreshed" in v else {})}
                                                for k, v in results.items()}, indent=2))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--projector", default="persona-deep-k1")
    ap.add_argument("--out", required=True)
    ap.add_argument("--limit", type=int, default=160)
    ap.add_argument("--noise", default="0.1,0.3,1.0")
    ap.add_argument("--k-runs", default="", help="comma-separated `e2p train` runs with other --prefix-tokens")
    ap.add_argument("--msc-limit", type=int, default=120)
    ap.add_argument("--generate", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    results = run_persona_study(load_backbone(), TextEncoder(), args.data, args.projector, args.out, limit=args.limit,
                                noise=tuple(float(x) for x in args.noise.split(",") if x),
                                k_runs=tuple(x for x in args.k_runs.split(",") if x), msc_limit=args.msc_limit,
                                generate=args.generate, seed=args.seed)
    print((Path(args.out) / "REPORT.md").read_text())
    for name, r in results.items():
        if name != "main":
            print(name, json.dumps({k: v["perplexity"] for k, v in r["conditions"].items()}))


if __name__ == "__main__":
    main()
