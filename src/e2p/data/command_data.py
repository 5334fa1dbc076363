"""The data a command runs on, as the data contract: --users/--examples as they are, or --data persona files
converted in memory (`e2p train`, `e2p eval`); one path for every data set after this."""
from __future__ import annotations

from pathlib import Path

from ..errors import E2PError


def contract_files(args) -> bool:
    """Whether the command runs on the data contract (--users and --examples); refuses half of it or both kinds."""
    given = [x for x in (args.users, args.examples) if x]
    if len(given) == 1:
        raise E2PError("give both --users (a table of user embeddings) and --examples (JSON lines or Parquet)")
    if given and args.data:
        raise E2PError("give either --data (persona files) or --users with --examples, not both")
    if not given and not args.data:
        raise E2PError("give --users FILE --examples FILE (your embeddings and examples), or --data (persona files)")
    return bool(given)


def load_contract(args):
    from .contract import load_examples, load_users

    users = load_users(args.users)
    examples = load_examples(args.examples, users)
    print(f"data: {len(users)} users ({users.dim}-dim embeddings) from {args.users}; {len(examples)} examples of "
          f"{len({e.user for e in examples})} users from {args.examples}")
    return users, examples


def command_data(args, training: bool, config=None, history_turns: int = 2):
    """The command's data as the data contract, before the command goes on along its one path: (users table,
    examples, the text encoder that embedded them or None). --users/--examples as they are; --data persona files
    converted in memory (each person's persona embedded by the text encoder, each reply an example): a folder
    means its training split (train, leakage-free, `persona_split`) or its test split (eval), a file all of it.
    Evaluation keeps at most --limit examples (seeded), drawn before persona data is embedded; `config`: the
    evaluated projector's (its encoder and formatting); `history_turns`: the training recipe's, for persona data."""
    from .contract import limit_examples

    if contract_files(args):
        if getattr(args, "people_half", None) is not None:
            raise E2PError("--people-half splits persona data (--data) by person id; with --users and --examples, "
                           "give the examples of the users to evaluate")
        users, examples = load_contract(args)
        return users, examples if training else limit_examples(examples, args.limit, args.seed), None
    from .persona import LoadReport, load_persona, people_half, persona_split
    from .persona_contract import persona_contract
    from .encoders import TextEncoder, encoder_for

    report = LoadReport()
    path = Path(args.data)
    if not path.is_dir():
        persona = load_persona(path, "all", report)
    elif training:
        persona = persona_split(path, args.with_msc, report)[0]
    else:
        persona = load_persona(path, "test", report)
    print(f"data: {report}")
    if not training and args.people_half is not None:  # two disjoint sets of people from one file, by person-id parity
        persona = people_half(persona, args.people_half)
        print(f"people half {args.people_half}: {len(persona)} examples of {len({e.person_id for e in persona})} people")
    encoder = TextEncoder(args.encoder)
    if training:
        users, examples = persona_contract(persona, encoder, history_turns)
    else:
        persona = limit_examples(persona, args.limit, args.seed)
        users, examples = persona_contract(persona, encoder_for(config, encoder), config.history_turns)
    return users, examples, encoder
