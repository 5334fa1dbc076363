"""The served projector's card (`GET /v1/projector`): backbone, k, injection, and the verdict of the projector's
`training_report.json`, so whoever compares replies with and without a user's embedding knows what was measured
about this projector (does the embedding carry the person, with the intervals) before reading the columns."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from .protocol_users import CallerInfo, Interval, ProjectorCard, TrainingVerdict
from .serving import OpenAIServing

log = logging.getLogger("e2p.serve")

REPORT = "training_report.json"


def read_verdict(projector_dir: Path | None) -> tuple[TrainingVerdict | None, str]:
    """-> (the verdict of `projector_dir`'s training report or None, a note saying what it means for the replies)."""
    if projector_dir is None:
        return None, "the served projector was not loaded from a folder (no training report): nothing was measured"
    path = Path(projector_dir) / REPORT
    if not path.is_file():
        return None, (f"{Path(projector_dir).name} has no {REPORT} (`e2p train` writes one), so nothing here says "
                      "whether its embeddings carry the person: read differences between the columns as unmeasured")
    try:
        report = json.loads(path.read_text())
        verdict = report["verdict"]
        comparisons = (report.get("validation") or {}).get("comparisons") or {}
        found = TrainingVerdict(
            carries_person=verdict.get("carries_person"), text=str(verdict["text"]),
            comparisons={name: Interval(relative_change=c["relative_change"], ci95=tuple(c["ci95"]))
                         for name, c in comparisons.items()},
            person_scale=report.get("person_scale"), verdict_users=report.get("verdict_users"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("training report unreadable", extra={"error": str(exc)})
        return None, f"{REPORT} of {Path(projector_dir).name} could not be read ({type(exc).__name__}): not measured"
    where = f"measured on {report.get('measured_on') or 'validation users never trained on'}"
    if found.carries_person:
        return found, f"{where}: the embedding carries the person"
    return found, (f"{where}: the embedding was NOT shown to carry the person, so differences between a user's "
                   "column and the others are style or chance, not that person")


def projector_card(serving: OpenAIServing, tenant: str, admin: bool, text_encoder: str | None) -> ProjectorCard:
    """The card of what `serving` serves, for a caller of `tenant`."""
    model, config = serving.model, serving.config
    projector = model.projector
    pconfig = projector.config if projector is not None else None
    report, note = read_verdict(Path(config.projector_dir) if config.projector_dir else None)
    if projector is None:
        note = "no projector: every column is the plain backbone, whatever the user"
    return ProjectorCard(
        model=config.model_name, backbone=model.backbone_name,
        engine="llama-cpp" if type(model).__name__ == "LlamaCppModel" else "torch",
        personalized=serving.embedding_dim is not None,
        injection=pconfig.injection if pconfig else None,
        num_prefix_tokens=pconfig.num_prefix_tokens if pconfig else None,
        prefix_position=pconfig.prefix_position if pconfig else None,
        embedding_dim=serving.embedding_dim, text_encoder=text_encoder,
        system_prompt=model.config.system_prompt or "",
        max_tokens_limit=config.max_tokens_limit, default_max_tokens=config.default_max_tokens,
        report=report, report_note=note, caller=CallerInfo(tenant=tenant, admin=admin))
