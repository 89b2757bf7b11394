"""Run state in the run dir: every candidate, generation rows, the score cache."""

from mergekit_evolver.ledger.store import GENERATIONS_LOG, LEDGER_FILE, Ledger
from mergekit_evolver.ledger.types import Candidate, Role, Status

__all__ = ["Candidate", "GENERATIONS_LOG", "LEDGER_FILE", "Ledger", "Role", "Status"]
