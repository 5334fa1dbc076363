"""Data sets, each loader yielding the same record types."""
from .pens import PensUser, load_pens, split_headlines, split_test_users
from .persona import PersonaExample, LoadReport, load_persona, persona_split

__all__ = ["PersonaExample", "LoadReport", "load_persona", "persona_split",
           "PensUser", "load_pens", "split_test_users", "split_headlines"]
