"""The two properties that make a testbed a fair merging problem, and its table."""

from __future__ import annotations

import statistics

from mergekit_evolver.testbed.lmeval_tasks import task_name
from mergekit_evolver.testbed.spec import TestbedSpec
from mergekit_evolver.testbed.store import spec_name


class TestbedPropertyError(AssertionError):
    """The trained models do not make a fair merging problem (see `check_properties`)."""

    __test__ = False


def property_margins(scores: dict[str, dict[str, float]], spec: TestbedSpec) -> dict:
    """Per family: specialist gain over base and specialist lead over the average
    on the family's own test task; plus the mean lead."""
    gain, gap = {}, {}
    for fam in spec.families:
        t = task_name(fam, "test")
        own = scores[spec_name(fam)][t]
        gain[fam] = own - scores["base"][t]
        gap[fam] = own - scores["average"][t]
    return {"gain": gain, "gap": gap, "mean_gap": statistics.fmean(gap.values())}


def check_properties(scores: dict[str, dict[str, float]], spec: TestbedSpec) -> None:
    """(a) each specialist beats the base by >= spec.min_specialist_gain on its own
    test task; (b) the uniform average trails the specialists on their own tasks by
    >= spec.min_mean_average_gap on average. Raises TestbedPropertyError otherwise."""
    m = property_margins(scores, spec)
    problems = []
    for fam, g in m["gain"].items():
        if g < spec.min_specialist_gain:
            t = task_name(fam, "test")
            problems.append(
                f"(a) family {fam!r}: specialist {scores[spec_name(fam)][t]:.3f} vs base "
                f"{scores['base'][t]:.3f} on {t}: gain {g:.3f} < {spec.min_specialist_gain}"
            )
    if m["mean_gap"] < spec.min_mean_average_gap:
        per = ", ".join(f"{f} {g:.3f}" for f, g in m["gap"].items())
        problems.append(
            f"(b) mean own-task lead of the specialists over the uniform average "
            f"{m['mean_gap']:.3f} < {spec.min_mean_average_gap} (per family: {per})"
        )
    if problems:
        raise TestbedPropertyError(
            f"testbed spec {spec.name!r} (seed {spec.seed}) is not a fair merging problem:\n  "
            + "\n  ".join(problems)
        )


def format_table(scores: dict[str, dict[str, float]], spec: TestbedSpec) -> str:
    cols = list(spec.families) + list(spec.ood_families)
    head = ["model"] + cols + ["mean_in", "mean_ood"]
    rows = []
    for name, by_task in scores.items():
        vals = [by_task[task_name(f, "test")] for f in cols]
        n_in = len(spec.families)
        mean_ood = f"{statistics.fmean(vals[n_in:]):.3f}" if spec.ood_families else "-"
        rows.append([name] + [f"{v:.3f}" for v in vals] + [f"{statistics.fmean(vals[:n_in]):.3f}", mean_ood])
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    title = (
        f"testbed {spec.name!r} (seed {spec.seed}): test accuracy, {spec.n_test} items per task, "
        f"4 choices (chance 0.25); OOD: {', '.join(spec.ood_families) or 'none'}"
    )
    return "\n".join([title, fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows])


def property_summary(scores: dict[str, dict[str, float]], spec: TestbedSpec) -> str:
    m = property_margins(scores, spec)
    gain = ", ".join(f"{f} {g:+.3f}" for f, g in m["gain"].items())
    gap = ", ".join(f"{f} {g:+.3f}" for f, g in m["gap"].items())
    state = "checked" if spec.check_properties else "not checked for this spec"
    return (
        f"(a) specialist - base, own task (need >= {spec.min_specialist_gain}): {gain}\n"
        f"(b) specialist - average, own task: {gap}; mean {m['mean_gap']:+.3f} "
        f"(need >= {spec.min_mean_average_gap}) [{state}]"
    )
