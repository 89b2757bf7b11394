"""The held-out report's verdict line and its references."""

from __future__ import annotations

from mergekit_evolver.config import ReportConfig
from mergekit_evolver.ledger import Candidate, Ledger, Role, Status
from mergekit_evolver.report.render import verdict, write_report

import pytest
from pydantic import ValidationError


def _row(name: str, ind: float, ood: float) -> Candidate:
    test = {"t_in_a": {"acc": ind}, "t_in_b": {"acc": ind}, "t_ood": {"acc": ood}}
    return Candidate(step=f"report/{name}", generation=0, role=Role.REPORT, status=Status.SCORED,
                     fitness=ind, test=test, note=name)


@pytest.fixture
def report(tmp_path):
    return ReportConfig.model_validate({
        "tasks": [{"name": "t_in_a", "group": "in_domain"}, {"name": "t_in_b", "group": "in_domain"},
                  {"name": "t_ood", "group": "ood"}],
        "references": [{"name": "multitask", "model": str(tmp_path)}],
        "baselines": ["average", "ties"],
    })


def test_verdict_compares_with_the_best_input_and_baseline_per_group(tmp_path, report):
    (tmp_path / "run").mkdir()
    ledger = Ledger.create(tmp_path / "run", {})
    for row in (_row("spec_a", 0.6, 0.3), _row("spec_b", 0.5, 0.35), _row("multitask", 0.99, 0.99),
                _row("average", 0.7, 0.2), _row("ties", 0.72, 0.25), _row("evolved", 0.71, 0.3)):
        ledger.record(row)
    line = verdict(ledger, report)
    # The reference beats everything, yet is neither the best input nor the best baseline.
    assert line == (
        "verdict: evolved in_domain 0.710, +0.110 above the best input (spec_a 0.600), "
        "-0.010 below the best baseline (ties 0.720); "
        "ood 0.300, -0.050 below the best input (spec_b 0.350), +0.050 above the best baseline (ties 0.250)"
    )
    table = write_report(tmp_path / "run", ledger, report)
    assert table.endswith(line) and "| multitask" in table
    assert (tmp_path / "run" / "report" / "table.md").read_text().strip().endswith(line)


def test_no_verdict_without_a_final_row(tmp_path, report):
    (tmp_path / "run").mkdir()
    ledger = Ledger.create(tmp_path / "run", {})
    ledger.record(_row("spec_a", 0.6, 0.3))
    assert verdict(ledger, report) is None


def test_reference_names_must_be_distinct(tmp_path):
    ref = {"name": "ties", "model": str(tmp_path)}
    with pytest.raises(ValidationError, match=r"names \['ties'\] are used twice"):
        ReportConfig.model_validate({"references": [ref], "baselines": ["ties"]})


def test_input_labels_tell_apart_models_whose_dirs_share_a_name():
    from pathlib import Path

    from mergekit_evolver.run import member_labels

    paths = [Path("/r/fused/model"), Path("/r/clm_only/model"), Path("/r/spec_rev")]
    assert member_labels(paths) == ["fused/model", "clm_only/model", "spec_rev"]
    assert member_labels([Path("/a/m"), Path("/a/m")]) == ["/a/m", "/a/m"]  # the same dir twice
