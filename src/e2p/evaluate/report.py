"""One report writer and one plot for the evaluation loop: results.json, REPORT.md, evaluation.png."""
from __future__ import annotations

import json
from pathlib import Path


def _pct(x: float) -> str:
    return f"{x * 100:+.2f}%"


def report_markdown(results: dict) -> str:
    ident = results.get("identification")
    lines = [
        "# E2P evaluation", "",
        f"{results['examples']} targets of {results['users']} users never trained on, {results['target_tokens']} target "
        f"tokens; projector `{results['projector']}` (person_scale {results.get('person_scale')}).", "",
        f"**Verdict:** {results['verdict']['text']}", "",
        "| condition | perplexity | ROUGE-1 | ROUGE-2 | ROUGE-L | identification (text) | identification (text+style) "
        "| tokens/request | bytes/user |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    cell = lambda c, k, f=".3f": format(c[k], f) if c.get(k) is not None else "-"
    ci = lambda c, k: (f"{c[k]:.3f} [{c[k + '_ci95'][0]:.3f}, {c[k + '_ci95'][1]:.3f}]" if c.get(k + "_ci95")
                       else cell(c, k))
    for name, c in results["conditions"].items():
        lines.append(f"| {name} | {cell(c, 'perplexity')} | {cell(c, 'rouge1')} | {cell(c, 'rouge2')} | "
                     f"{cell(c, 'rougeL')} | {ci(c, 'identification')} | {ci(c, 'identification_style')} | "
                     f"{cell(c, 'tokens_per_request', '.1f')} | "
                     f"{cell(c, 'bytes_per_user', 'd')} |")
    adapted = [name for name, c in results["conditions"].items() if c.get("adapter_parameters")]
    if adapted:  # the shared LoRA adapter (e2p train --lora-rank): a cost once per deployment, not per user
        c = results["conditions"][adapted[0]]
        lines += ["", f"Shared LoRA adapter in {', '.join(adapted)} (each condition its own, trained alike): "
                      f"{c.get('adapter', '')}, {c['adapter_bytes']:,} bytes in float32, stored once for every user; "
                      "per user E2P still stores one embedding (bytes/user)."]
    if ident:
        lines += ["", f"Identification: share of {ident['generations']} greedy generations closer (all-MiniLM-L6-v2 cosine) "
                      f"to their own user's reference ({ident['reference']}) than to each of the other "
                      f"{ident['users'] - 1} users'; chance is {ident['chance']:.3f}. By text and style: the same "
                      "text vector joined with the writing style (capitalisation, length, punctuation), against each "
                      "user's other targets; 95% intervals over users."]
        paired = [(reader, key, v) for reader, info in (("text", ident), ("text+style", ident.get("style") or {}))
                  for key, v in (info.get("paired") or {}).items()]
        if paired:
            lines += ["", "Paired on the same generations (hits of a minus hits of b; users where a identifies more "
                          "/ less often):", "", "| reader | comparison | difference | 95% interval | users higher / lower |",
                      "|---|---|---|---|---|"]
            lines += [f"| {reader} | {key.replace('_vs_', ' vs ')} | {v['difference']:+.3f} | "
                      f"[{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}] | {v['users_higher']} / {v['users_lower']} of "
                      f"{v['users']} |" for reader, key, v in paired]
    lines += ["", "## Paired comparisons (95% interval from a bootstrap over users)", "",
              "| comparison | perplexity change | 95% interval |", "|---|---|---|"]
    for key, v in results["comparisons"].items():
        lines.append(f"| {key.replace('_vs_', ' vs ')} | {_pct(v['relative_change'])} | "
                     f"[{_pct(v['ci95'][0])}, {_pct(v['ci95'][1])}] |")
    if results.get("samples"):
        lines += ["", "## Greedy generations (first examples)", ""]
        for s in results["samples"]:
            lines.append(f"- **{s['user']}** | prompt: {s['prompt'][:120]!r} | target: {s['target'][:120]!r}")
            for name in results["conditions"]:
                if name in s:
                    lines.append(f"  - {name}: {s[name][:160]!r}")
    return "\n".join(lines) + "\n"


def plot_results(results: dict, path: Path) -> None:
    """Perplexity per condition, and identification accuracy with its chance level where measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, c in results["conditions"].items() if c.get("perplexity") is not None]
    ident = [results["conditions"][n].get("identification") for n in names]
    panels = 2 if any(v is not None for v in ident) else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    colors = ["#999" if n in ("none", "text") else "#4a7" if n.startswith("e2p") else "#68c" for n in names]
    bars = axes[0, 0].bar(names, [results["conditions"][n]["perplexity"] for n in names], color=colors)
    axes[0, 0].bar_label(bars, fmt="%.2f")
    axes[0, 0].set_ylabel("target perplexity (lower is better)")
    axes[0, 0].set_title(f"{results['examples']} targets of {results['users']} unseen users")
    if panels == 2:
        shown = [(n, v) for n, v in zip(names, ident) if v is not None]
        bars = axes[0, 1].bar([n for n, _ in shown], [v for _, v in shown], color=[colors[names.index(n)] for n, _ in shown])
        axes[0, 1].bar_label(bars, fmt="%.2f")
        axes[0, 1].axhline(results["identification"]["chance"], color="k", ls="--", lw=1, label="chance")
        axes[0, 1].set_ylabel("identification accuracy (higher is better)")
        axes[0, 1].set_title("generation closest to its own user")
        axes[0, 1].legend()
    for ax in axes[0]:
        plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(results: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    (out_dir / "REPORT.md").write_text(report_markdown(results))
    plot_results(results, out_dir / "evaluation.png")
