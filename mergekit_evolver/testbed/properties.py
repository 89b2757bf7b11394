"""The properties that make a testbed the merging problem its kind promises, and its table.

disjoint: (a) every specialist gains >= min_specialist_gain over the base on
its own family; (b) the uniform average trails the specialists on their own
families by >= min_mean_average_gap on average.

merge_friendly: (a) the base is above chance and below each specialist on that
specialist's family; (b) each specialist gains >= min_specialist_gain over the
base on its family; (c) the uniform average's mean over the families is at
least the best specialist's mean (merging helps); (d) the average keeps less
than max_kept_gain of the gain of at least min_room_families specialists
(room for a search). All on the held-out test split.
"""

from __future__ import annotations

import statistics

from mergekit_evolver.testbed.lmeval_tasks import task_name
from mergekit_evolver.testbed.spec import TestbedSpec
from mergekit_evolver.testbed.store import spec_name


class TestbedPropertyError(AssertionError):
    """The trained models do not make a fair merging problem (see `check_properties`)."""

    __test__ = False


CHANCE = 0.25  # four choices per item


def property_margins(scores: dict[str, dict[str, float]], spec: TestbedSpec) -> dict:
    """Per family: specialist gain over base, specialist lead over the average,
    and the share of the gain the average keeps, on the family's own test task;
    plus the mean lead and the in-domain means of the average and of each model."""
    gain, gap, kept = {}, {}, {}
    for fam in spec.families:
        t = task_name(fam, "test")
        own = scores[spec_name(fam)][t]
        gain[fam] = own - scores["base"][t]
        gap[fam] = own - scores["average"][t]
        kept[fam] = (scores["average"][t] - scores["base"][t]) / gain[fam] if gain[fam] > 0 else float("nan")
    in_domain = [task_name(f, "test") for f in spec.families]
    means = {name: statistics.fmean(row[t] for t in in_domain) for name, row in scores.items()}
    return {
        "gain": gain, "gap": gap, "kept": kept, "mean_gap": statistics.fmean(gap.values()),
        "means": means,
    }


def _merge_friendly_problems(scores: dict[str, dict[str, float]], spec: TestbedSpec) -> list[str]:
    m = property_margins(scores, spec)
    problems = []
    for fam in spec.families:
        t = task_name(fam, "test")
        base, own = scores["base"][t], scores[spec_name(fam)][t]
        if not CHANCE < base < own:
            problems.append(f"(a) family {fam!r}: base {base:.3f} is not between chance {CHANCE} and its specialist {own:.3f}")
        if m["gain"][fam] < spec.min_specialist_gain:
            problems.append(f"(b) family {fam!r}: specialist gain {m['gain'][fam]:.3f} < {spec.min_specialist_gain}")
    best = max(m["means"][spec_name(f)] for f in spec.families)
    if m["means"]["average"] < best:
        problems.append(f"(c) the uniform average's in-domain mean {m['means']['average']:.3f} < the best specialist's {best:.3f}")
    room = [f for f, k in m["kept"].items() if k < spec.max_kept_gain]
    if len(room) < spec.min_room_families:
        per = ", ".join(f"{f} {k:.2f}" for f, k in m["kept"].items())
        problems.append(
            f"(d) the average keeps < {spec.max_kept_gain} of the gain of {len(room)} specialists, "
            f"need {spec.min_room_families} (kept: {per})"
        )
    return problems


def check_properties(scores: dict[str, dict[str, float]], spec: TestbedSpec) -> None:
    """The properties of the spec's kind (module docstring); raises
    TestbedPropertyError naming each one that fails."""
    problems = property_problems(scores, spec)
    if problems:
        raise TestbedPropertyError(
            f"testbed spec {spec.name!r} (seed {spec.seed}) is not the {spec.kind} merging problem it should be:\n  "
            + "\n  ".join(problems)
        )


def property_problems(scores: dict[str, dict[str, float]], spec: TestbedSpec) -> list[str]:
    if spec.kind == "merge_friendly":
        return _merge_friendly_problems(scores, spec)
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
    return problems


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
    if spec.kind == "merge_friendly":
        state = "checked" if spec.check_properties else "not checked for this spec"
        base = ", ".join(f"{f} {scores['base'][task_name(f, 'test')]:.3f}" for f in spec.families)
        gain = ", ".join(f"{f} {g:+.3f}" for f, g in m["gain"].items())
        kept = ", ".join(f"{f} {k:.2f}" for f, k in m["kept"].items())
        best = max(spec.families, key=lambda f: m["means"][spec_name(f)])
        problems = property_problems(scores, spec)
        return (
            f"(a) base on each family (above chance {CHANCE}, below its specialist): {base}\n"
            f"(b) specialist - base, own family (need >= {spec.min_specialist_gain}): {gain}\n"
            f"(c) uniform average in-domain mean {m['means']['average']:.3f} vs best specialist "
            f"{spec_name(best)} {m['means'][spec_name(best)]:.3f} (need >=)\n"
            f"(d) share of each gain the average keeps (need < {spec.max_kept_gain} for "
            f">= {spec.min_room_families}): {kept}\n"
            f"properties: {'all hold' if not problems else f'{len(problems)} fail'} [{state}]"
        )
    gain = ", ".join(f"{f} {g:+.3f}" for f, g in m["gain"].items())
    gap = ", ".join(f"{f} {g:+.3f}" for f, g in m["gap"].items())
    state = "checked" if spec.check_properties else "not checked for this spec"
    return (
        f"(a) specialist - base, own task (need >= {spec.min_specialist_gain}): {gain}\n"
        f"(b) specialist - average, own task: {gap}; mean {m['mean_gap']:+.3f} "
        f"(need >= {spec.min_mean_average_gap}) [{state}]"
    )
