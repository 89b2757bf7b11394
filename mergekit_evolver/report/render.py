"""Result tables, plots and the model card, all read from the ledger."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from mergekit_evolver.config import TaskSpec
from mergekit_evolver.scoring.lmeval import metric_name
from mergekit_evolver.ledger import Candidate, Ledger

REPORT_DIR = "report"


def score_of(candidate: Candidate, spec: TaskSpec) -> Optional[float]:
    return candidate.test.get(spec.name, {}).get(metric_name(spec.metric))


def groups(specs: Sequence[TaskSpec]) -> dict[str, list[TaskSpec]]:
    out: dict[str, list[TaskSpec]] = {}
    for spec in specs:
        if spec.group:
            out.setdefault(spec.group, []).append(spec)
    return out


def group_mean(candidate: Candidate, specs: Sequence[TaskSpec]) -> Optional[float]:
    values = [score_of(candidate, s) for s in specs]
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)


def table_rows(ledger: Ledger, specs: Sequence[TaskSpec]) -> tuple[list[str], list[list[str]]]:
    header = ["model", "dev fitness"] + [s.name for s in specs]
    header += [f"mean {g}" for g in groups(specs)]
    rows = []
    for c in ledger.candidates("report"):
        cells = [c.note or c.step, _fmt(c.fitness)]
        cells += [_fmt(score_of(c, s)) for s in specs]
        cells += [_fmt(group_mean(c, g)) for g in groups(specs).values()]
        rows.append(cells)
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4f}"


def save_plots(run_dir: Path, ledger: Ledger, specs: Sequence[TaskSpec]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(run_dir) / REPORT_DIR
    out.mkdir(exist_ok=True)
    written = []
    gens = ledger.generations()
    if gens:
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [g["generation"] for g in gens]
        for key in ("best", "mean", "min"):
            ax.plot(xs, [g.get(key) for g in gens], marker="o", label=key)
        if any(g.get("merged") is not None for g in gens):
            ax.plot(xs, [g.get("merged") for g in gens], marker="s", label="merged population")
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("generation (0 = initial population)")
        ax.set_ylabel("dev fitness")
        ax.set_title("Population fitness per generation")
        ax.legend()
        fig.tight_layout()
        path = out / "fitness.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    if any(g.get("kinship") is not None for g in gens):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([g["generation"] for g in gens], [g.get("kinship") for g in gens], marker="o")
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("generation (0 = initial population)")
        ax.set_ylabel("mean pairwise kinship")
        ax.set_title("Population kinship per generation")
        fig.tight_layout()
        path = out / "kinship.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    reports = ledger.candidates("report")
    if reports and specs:
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(specs) * len(reports) / 3), 4))
        width = 0.8 / len(reports)
        for k, c in enumerate(reports):
            xs = [i + k * width for i in range(len(specs))]
            ax.bar(xs, [score_of(c, s) or 0 for s in specs], width, label=c.note or c.step)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(specs))])
        ax.set_xticklabels([s.name for s in specs], rotation=30, ha="right")
        ax.set_ylabel("score")
        ax.set_title("Held-out scores per task")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = out / "scores.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


FINAL = "evolved"  # the report row of the run's model


def verdict(ledger: Ledger, report) -> Optional[str]:
    """One line: the final model's mean in each task group against the best
    input and the best baseline there (on held-out scores, so the strongest
    competitor in each group; references such as a multi-task fine-tune are
    bounds, not competitors). None without groups or a final row."""
    rows = {c.note: c for c in ledger.candidates("report")}
    if FINAL not in rows:
        return None
    references = {r.name for r in report.references}
    baselines = [n for n in report.baselines if n in rows]
    inputs = [n for n in rows if n not in references and n not in baselines and n != FINAL]
    parts = []
    for group, specs in groups(report.tasks).items():
        mine = group_mean(rows[FINAL], specs)
        if mine is None:
            continue
        said = [f"{group} {mine:.3f}"]
        for kind, names in (("input", inputs), ("baseline", baselines)):
            scored = [(group_mean(rows[n], specs), n) for n in names]
            scored = [(v, n) for v, n in scored if v is not None]
            if scored:
                best, name = max(scored)
                word = "above" if mine > best else "below" if mine < best else "level with"
                said.append(f"{mine - best:+.3f} {word} the best {kind} ({name} {best:.3f})")
        parts.append(", ".join(said))
    return f"verdict: {FINAL} " + "; ".join(parts) if parts else None


def write_report(run_dir: Path, ledger: Ledger, report) -> str:
    """The table (and its verdict line), saved with the plots under run_dir/report."""
    specs = report.tasks
    header, rows = table_rows(ledger, specs)
    table = markdown_table(header, rows)
    line = verdict(ledger, report)
    if line:
        table += "\n\n" + line
    out = Path(run_dir) / REPORT_DIR
    out.mkdir(exist_ok=True)
    (out / "table.md").write_text(table + "\n", encoding="utf-8")
    save_plots(run_dir, ledger, specs)
    return table


def model_card(config_yaml: str, table: str, final_recipe: str) -> str:
    return f"""---
library_name: transformers
tags: [mergekit, merge, mergekit-evolver, evolutionary-merge]
---
# Evolved merge

Made by mergekit-evolver: an evolutionary search over whole models, every
candidate merged by mergekit and scored with lm-evaluation-harness. Selection used dev tasks only; the table below is on
held-out tasks.

## Results

{table}

## How it was made

The last recipe (its parents are in the run's `population/`; `lineage/`
holds the whole chain, each step replayable with `mergekit-evolver yaml`):

```yaml
{final_recipe.strip()}
```

Run config:

```yaml
{config_yaml.strip()}
```
"""


def report_from_run_dir(run_dir: Path) -> str:
    from mergekit_evolver.config import EvolveConfig
    from mergekit_evolver.errors import UserError
    from mergekit_evolver.ledger import LEDGER_FILE

    run_dir = Path(run_dir)
    if not (run_dir / LEDGER_FILE).is_file():
        raise UserError(f"{run_dir} holds no run")
    from mergekit_evolver.config.load import load_yaml

    config_file = run_dir / "run.yml"
    config = EvolveConfig.model_validate(load_yaml(config_file.read_text(), str(config_file)))
    ledger = Ledger(run_dir)
    try:
        return write_report(run_dir, ledger, config.report)
    finally:
        ledger.close()
