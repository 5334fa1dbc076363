"""Data sets, each loader yielding the same record types."""
from .persona import PersonaExample, LoadReport, load_persona, persona_split

__all__ = ["PersonaExample", "LoadReport", "load_persona", "persona_split"]
