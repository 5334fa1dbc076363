"""`e2p` command line: train, eval, generate, demo."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .data.command_data import command_data, contract_files
from .errors import E2PError
from .training.recipe_config import recipe_from_args


def _backbone(args):
    """The backbone a command names (--backbone), on --device in --dtype (training picks its autocast itself)."""
    from .backbone import load_backbone

    backbone = load_backbone(args.backbone, device=args.device, dtype=args.dtype)
    if getattr(args, "gradient_checkpointing", False):
        from .backbone import enable_gradient_checkpointing

        enable_gradient_checkpointing(backbone)
    return backbone


def cmd_train(args) -> None:
    """One path for every data set: persona files become the data contract first (`_command_data`), then the
    default recipe trains on it, data-parallel under torchrun / accelerate launch."""
    from .training.distributed import init_distributed, is_main_process
    from .training.recipe import train_on_examples

    from .training.privacy import check_epsilon_delta

    check_epsilon_delta(args.dp_epsilon, args.dp_delta)  # before any data or model loads
    recipe = recipe_from_args(args, dp_epsilon=args.dp_epsilon, dp_delta=args.dp_delta, dp_max_grad_norm=args.dp_clip,
                            dp_examples_per_user=args.dp_examples_per_user)  # RecipeConfig.check(): before loading too
    init_distributed()  # torchrun / accelerate launch: one process group, batches split, rank 0 writes
    users, examples, encoder = command_data(args, training=True, history_turns=recipe.history_turns)
    backbone = _backbone(args)  # the text encoder, if any, embedded persona data above; files bring their own
    report = train_on_examples(backbone, users, examples, args.out, recipe, val_users=args.val_users,
                               minutes=args.minutes, shared_dir=args.shared_from, resume=args.resume,
                               encoder_name=getattr(encoder, "name", ""))
    if not is_main_process():
        return
    print(f"trained on {report['train_users']} users ({report['train_examples']} examples) in {report['seconds']:.0f}s; "
          f"{report['validation_users']} validation users never trained on")
    if "person_scale" in report:
        print(f"person_scale {report['person_scale']['chosen']} (calibrated on {report['selection_users']} validation users)")
        if report["person_scale"]["chosen"] == 0:
            print("warning: on validation users every share of the person part made targets worse, so the projector "
                  "equals its shared prefix: these embeddings do not carry what the targets need about new users. "
                  "Try embeddings that describe users more richly, more users to train on, or a smaller projector "
                  "(--hidden-dims linear).")
    if "adapter" in report:
        a = report["adapter"]
        print(f"shared LoRA adapter (rank {a['rank']} on {', '.join(a['targets'])}): {a['parameters']:,} parameters, "
              f"{a['bytes_float32']:,} bytes, one for every user; per user still {a['per_user_storage']}; its controls "
              f"trained alike: shared_prefix/ (continued) and shuffled_trained/")
    if "privacy" in report:
        p = report["privacy"]
        print(f"differential privacy per user: (epsilon {p['epsilon']:.3f}, delta {p['delta']:.3g}) spent over "
              f"{p['steps']} DP-SGD steps (target epsilon {p['target_epsilon']}, noise multiplier "
              f"{p['noise_multiplier']:.3f}, {p['expected_users_per_step']:.1f} users per step, clip {p['max_grad_norm']})")
    print(f"verdict on {report['verdict_users']} other validation users: {report['verdict']['text']}")
    print(f"projector saved to {args.out}; details in {Path(args.out) / 'training_report.json'}")
    print(f"load it with Projector.from_pretrained({str(args.out)!r})")


def cmd_eval(args) -> None:
    """One path for every data set: persona files become the data contract first (`_command_data`), then every
    condition is scored on the same examples."""
    from .config import E2PConfig, resolve_projector
    from .evaluate import evaluate_examples

    contract_files(args)  # a data error before a projector error, as before
    if args.projector is None:
        raise E2PError("--projector is required: a folder `e2p train` wrote or a shipped name (persona-deep-k1)")
    config = E2PConfig.load(resolve_projector(args.projector))
    from .engines import check_engine

    check_engine(args.engine, config)  # before any data or model loads
    users, examples, encoder = command_data(args, training=False, config=config)
    backbone = _backbone(args)
    evaluate_examples(backbone, users, examples, args.projector, args.out, generate=args.generate,
                      batch_size=args.batch_size, seed=args.seed, encoder=encoder, engine=_eval_engine(args, backbone),
                      only=[c.strip() for c in args.conditions.split(",") if c.strip()] if args.conditions else None)
    print((Path(args.out) / "REPORT.md").read_text())


def cmd_audit(args) -> None:
    """Membership inference and what replies reveal, for a projector folder `e2p train` wrote."""
    from .config import resolve_projector
    from .data.contract import load_examples, load_users
    from .evaluate.audit import audit_projector, training_users

    training_users(resolve_projector(args.projector), args.train_users)  # a missing list before the backbone loads
    users = load_users(args.users)
    examples = load_examples(args.examples, users)
    backbone = _backbone(args)
    audit_projector(backbone, users, examples, args.projector, args.out, train_users=args.train_users,
                    examples_per_user=args.examples_per_user, max_users=args.max_users, candidates=args.candidates,
                    batch_size=args.batch_size, seed=args.seed)
    print((Path(args.out) / "REPORT.md").read_text())
    print(f"written: {Path(args.out) / 'REPORT.md'}, results.json, audit.png")


def _eval_engine(args, backbone):
    from .engines import evaluation_engine

    from .engines import vllm_engine_args

    return evaluation_engine(backbone, args.engine, args.gguf, n_seq_max=args.batch_size, vllm_args=vllm_engine_args(args))


def cmd_data(args) -> None:
    if args.study == "pens":
        from .data.pens_contract import write_pens_contract

        card = write_pens_contract(args.src, args.out, test_users=args.test_users, test_fraction=args.test_fraction,
                                   behaviour=args.behaviour, behaviour_dim=args.behaviour_dim, seed=args.seed,
                                   profile_slots=args.profile_slots,
                                   **({} if args.profile_set is None else {"profile_set": args.profile_set}))
    else:
        from .data.persona_contract import write_persona_contract

        card = write_persona_contract(args.src, args.out, history_turns=args.history_turns)
    for name, part in card["parts"].items():
        print(f"{name}: {part['users']} users, {part['examples']} examples -> {part['folder']}")
    users = card.get("default_profile", "users.npz")
    print(f"train: e2p train --users {args.out}/{users} --examples {args.out}/examples.jsonl --out runs/{args.study}")


def cmd_generate(args) -> None:
    from .config import E2PConfig
    from .store.files import read_vector
    from .engines import DEFAULT_PROJECTOR, check_engine, vllm_engine_args
    from .loading import load

    args.projector = args.projector or DEFAULT_PROJECTOR[args.engine]
    users = [("persona", p) for p in args.persona or []] + [("embedding", e) for e in args.embedding or []]
    if not users:
        raise E2PError("give at least one --persona TEXT or --embedding FILE")
    config = E2PConfig.load(args.projector)
    check_engine(args.engine, config)  # an engine that cannot run the projector: before the backbone loads
    # files are checked before the backbone loads
    rows = [value if kind == "persona" else read_vector(value, config.embedding_dim) for kind, value in users]
    model = load(args.projector, engine=args.engine, backbone=args.backbone, device=args.device, dtype=args.dtype,
                 gguf=args.gguf, max_batch_size=max(len(users), 1), max_new_tokens=args.max_new_tokens,
                 vllm_args=vllm_engine_args(args))
    kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                  top_p=args.top_p, seed=args.seed)
    replies = model.generate([args.message] * len(users), users=rows, **kwargs)
    plain = model.generate([args.message], users=[None], **kwargs)[0] if args.compare else None
    if plain is not None:
        print(f"[no personalization] {plain}\n")
    for (kind, value), reply in zip(users, replies):
        print(f"[{kind}: {value}]\n{reply}\n")


def cmd_demo(args) -> None:
    from .evaluate.demo import run_demo

    run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    from .backbone import BACKBONE_HELP
    from .devices import add_device_arguments
    from .engines import add_engine_arguments

    parser = argparse.ArgumentParser(prog="e2p", description="Embedding-to-Prefix personalization for a frozen LLM")
    from . import __version__

    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log what happens, third-party progress bars included (before or after the command)")
    parser.add_argument("--version", action="version", version=f"e2p {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--backbone", default=None, help=BACKBONE_HELP)
        p.add_argument("--seed", type=int, default=0,
                       help="seeds initial weights, data order and sampling")
        add_device_arguments(p)

    t = sub.add_parser("train", help="train a projector (and its style-only control) on your users' embeddings and "
                                      "examples, or on persona data")
    common(t)
    t.add_argument("--users", default=None, help="user embeddings: .parquet/.csv/.jsonl/.npz/.npy, as `e2p users import` reads")
    t.add_argument("--examples", default=None, help="examples: JSON lines or Parquet with `user` and `messages` or "
                                                     "`prompt` + `completion` (see README)")
    t.add_argument("--val-users", type=int, default=None,
                   help="with --users: validation users never trained on (default: 20%%, at least 4)")
    t.add_argument("--shared-from", default=None, help=argparse.SUPPRESS)  # research: the Python API's shared_dir
    t.add_argument("--data", default=None, help="persona file or folder (a folder means its training split)")
    t.add_argument("--out", required=True,
                   help="the run folder: the projector (save_pretrained), its controls and report")
    t.add_argument("--steps", type=int, default=None, help="total optimizer steps over all stages (default: the recipe's)")
    t.add_argument("--minutes", type=float, default=None, help="wall-clock budget, split across stages")
    t.add_argument("--recipe", default=None,
                   help="a recipe.json (as every run writes one): the research knobs (hidden_dims, dropout, "
                        "person_map, prefix_position, text_steps, ...); the flags here override it")
    t.add_argument("--injection", choices=["input", "deep"], default=None,
                   help="deep (default): a key/value prefix in every layer (torch only); input: k vectors before the "
                        "prompt (any engine: llama.cpp, vLLM)")
    t.add_argument("--prefix-tokens", type=int, default=None,
                   help="k, the soft tokens per user (default 1, measured best)")
    t.add_argument("--batch-size", type=int, default=None, help="examples per optimizer step (default 16; with "
                                                                 "--dp-epsilon the expected users per step)")
    t.add_argument("--lora-rank", type=int, default=None,
                   help="R > 0: also train one shared LoRA adapter of rank R on the backbone with the projector (one "
                        "for every user, saved in the projector; per-user storage stays one embedding), with its "
                        "controls trained alike (torch engine only)")
    for flag, kind in (("--hidden-dims", str), ("--dropout", float), ("--person-map", str), ("--embedding-slots", int),
                       ("--max-train-users", int), ("--lora-targets", str), ("--lora-lr", float),
                       ("--prefix-position", str), ("--text-steps", int), ("--val-examples", int)):
        t.add_argument(flag, type=kind, default=None, help=argparse.SUPPRESS)  # research knobs: --recipe FILE
    t.add_argument("--with-msc", action="store_true", help=argparse.SUPPRESS)  # research: persona drift studies
    t.add_argument("--encoder", default=None,
                   help="with --data: the text encoder for persona embeddings (default all-MiniLM-L6-v2)")
    t.add_argument("--resume", action="store_true", help="continue an interrupted run from DIR/*/checkpoint")
    t.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute the backbone's activations in the backward pass: far less memory, ~30%% slower")
    t.add_argument("--dp-epsilon", type=float, default=None,
                   help="train with DP-SGD per user (Opacus) to this epsilon over the whole run (e.g. 1, 4, 16; "
                        "docs/privacy.md); --batch-size is then the expected users per step")
    t.add_argument("--dp-delta", type=float, default=None,
                   help="with --dp-epsilon: delta, below 1 / training users (default 1 / (10 x training users))")
    t.add_argument("--dp-clip", type=float, default=None,
                   help="with --dp-epsilon: each sampled user's gradient is clipped to this norm (default 1)")
    t.add_argument("--dp-examples-per-user", type=int, default=None,
                   help="with --dp-epsilon: at most this many of a sampled user's examples make its gradient in a "
                        "step (default 4; fewer: cheaper steps, the same guarantee)")
    t.set_defaults(func=cmd_train, seed=None)  # --seed: the recipe file's unless given

    e = sub.add_parser("eval", help="score every condition (none, shared_prefix, shuffled, e2p, text) on unseen users "
                                    "(the studies' own parts: research/)")
    common(e)
    e.add_argument("--users", default=None, help="user embeddings of the users to evaluate (any `e2p users import` format)")
    e.add_argument("--examples", default=None, help="their examples (JSON lines or Parquet, the data contract)")
    e.add_argument("--generate", type=int, default=64,
                   help="greedy generations scored by ROUGE-1/2/L and identification (0: none)")
    e.add_argument("--data", default=None, help="persona file or folder (a folder means its test split)")
    e.add_argument("--projector", default=None, help="a folder `e2p train` wrote, or a shipped name (persona-deep-k1)")
    e.add_argument("--out", required=True,
                   help="folder for REPORT.md, results.json and the plot")
    e.add_argument("--limit", type=int, default=None,
                   help="score at most this many target replies (default: all)")
    e.add_argument("--batch-size", type=int, default=16,
                   help="rows per forward pass")
    e.add_argument("--encoder", default=None,
                   help="with --data: the text encoder for persona embeddings (default: the projector's)")
    add_engine_arguments(e)
    e.add_argument("--conditions", default=None,
                   help="comma-separated conditions to score (default: all the projector supports, e.g. "
                        "none,shared_prefix,shuffled,e2p,text)")
    e.add_argument("--people-half", type=int, choices=[0, 1], default=None,
                   help="evaluate only one of two disjoint halves of the people (by id parity)")
    e.set_defaults(func=cmd_eval)

    a = sub.add_parser("audit", help="what a trained projector reveals: membership inference (AUC) and identification "
                                     "of users from greedy replies (docs/privacy.md)")
    common(a)
    a.add_argument("--users", required=True, help="user embeddings (any `e2p users import` format)")
    a.add_argument("--examples", required=True, help="examples of training users and of unseen users (the data contract)")
    a.add_argument("--projector", required=True, help="the run folder `e2p train` wrote (its split.json names the training users)")
    a.add_argument("--train-users", default=None,
                   help="the training users' ids (one per line, or a JSON list) instead of the run's split.json")
    a.add_argument("--out", required=True, help="folder for REPORT.md, results.json and audit.png")
    a.add_argument("--examples-per-user", type=int, default=8, help="examples scored per user for membership inference")
    a.add_argument("--max-users", type=int, default=200, help="at most this many training and this many unseen users")
    a.add_argument("--candidates", type=int, default=20,
                   help="N users whose greedy replies the attacker tries to attribute (0: skip)")
    a.add_argument("--batch-size", type=int, default=16, help="rows per forward pass")
    a.set_defaults(func=cmd_audit)

    g = sub.add_parser("generate", help="reply to a message as one or more users")
    common(g)
    g.add_argument("--projector", default=None,
                   help="a shipped name or a folder `e2p train` wrote (default: persona-deep-k1; with --engine "
                        "llama-cpp the input-injection persona-input-k1)")
    add_engine_arguments(g)
    g.add_argument("--persona", action="append", help="persona text of a user (repeatable)")
    g.add_argument("--embedding", action="append", help="embedding file .npy/.json/.safetensors/.csv (repeatable)")
    g.add_argument("--message", required=True,
                   help="the user's message to answer")
    g.add_argument("--max-new-tokens", type=int, default=48,
                   help="at most this many tokens in the reply")
    g.add_argument("--sample", action="store_true",
                   help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=0.7,
                   help="with --sample")
    g.add_argument("--top-p", type=float, default=0.9,
                   help="with --sample: nucleus sampling")
    g.add_argument("--compare", action="store_true", help="also print the unpersonalized reply")
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("demo", help="the main job: E2P on unseen people, end to end")
    common(d)
    d.add_argument("--data", default=None, help="persona data folder for the full table (default: the 24 unseen "
                                                "people shipped with the package)")
    d.add_argument("--projector", default=None, help="use this projector instead of the shipped one")
    d.add_argument("--limit", type=int, default=120, help="examples for the perplexity table")
    d.set_defaults(func=cmd_demo)
    dt = sub.add_parser("data", help="convert a shipped study's data into the data contract (users + examples)")
    dt.add_argument("study", choices=["persona", "pens"], help="which dataset to prepare")
    dt.add_argument("src", help="persona folder or file / PENS .tsv file or folder")
    dt.add_argument("--out", required=True,
                    help="folder for the users tables, examples.jsonl, test/ and data_card.json")
    dt.add_argument("--test-users", default=None, help="pens: a PENS file of users who are only evaluated, never trained on")
    dt.add_argument("--test-fraction", type=float, default=0.0,
                    help="pens without --test-users: hold out this share of SRC's users as test users")
    dt.add_argument("--behaviour", choices=["coclick", "als", "item2vec"], default="coclick",
                    help="pens: the click encoder of the behavioural profile (see e2p.data.behaviour)")
    dt.add_argument("--behaviour-dim", type=int, default=64, help="pens: size of the behavioural user embedding")
    dt.add_argument("--profile-slots", type=int, default=0,
                    help="pens: also write users_text_slots.npz, each history as N cluster vectors (e2p train "
                         "--embedding-slots N)")
    dt.add_argument("--profile-set", type=int, default=None,
                    help="pens: users_text_set.npz keeps up to N history items per user (default 100; 0: no set file), "
                         "the default profile: `e2p train --users users_text_set.npz` pools them by attention")
    dt.add_argument("--history-turns", type=int, default=2, help="persona: earlier turns kept in each prompt")
    dt.add_argument("--seed", type=int, default=0,
                    help="seeds the split of users")
    dt.set_defaults(func=cmd_data)
    from .serve.cli import add_serve_commands
    add_serve_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = any(a in ("-v", "--verbose") for a in argv)  # -v anywhere: `e2p -v train ...` or `e2p train ... -v`
    args = build_parser().parse_args([a for a in argv if a not in ("-v", "--verbose")])
    args.verbose = verbose
    if not args.verbose:  # third-party progress bars and advice ("Loading weights") only with -v; ours stay
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except E2PError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; `e2p train ... --resume` continues from the last checkpoint", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
