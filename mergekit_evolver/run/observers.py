"""Experiment loggers that watch a run (config `logging:`): Weights & Biases
and TensorBoard. Run.notify calls each one's candidate(row) after every
computed ledger row, generation(number, stats) at each generation's end,
finish(table) with the final table, and Run.close calls close().

They change no result, so they never stop a run: a missing package, a logger
that will not start, or one that fails midway is a one-line warning through
the run's log, and the run goes on without that logger.

On a resume the loop replays recorded candidates without telling observers
but ends every recorded generation again. Each logger keeps its own counters
in <run_dir>/logs/<logger>.json (and wandb its run id), so a resumed run
continues the same candidate numbering, logs no generation twice and stays
one wandb run.
"""

from __future__ import annotations

import json
import math
import numbers
import secrets
import string
from pathlib import Path
from typing import Any, Callable, Optional

from mergekit_evolver.ledger import Candidate, Status

Log = Callable[[str], None]
INSTALL_HINT = "pip install 'mergekit-evolver[logging]'"


def logs_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "logs"


def new_run_id() -> str:
    # wandb's own form (8 of [a-z0-9]); random, and kept in the run dir, so
    # two runs of one config never share a wandb run.
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def candidate_scalars(row: Candidate) -> dict[str, float]:
    """A ledger row's numbers, under the names both loggers use."""
    scalars: dict[str, float] = {"candidate/generation": float(row.generation)}
    if row.fitness is not None:
        scalars["candidate/fitness"] = float(row.fitness)
    for task, metrics in sorted(row.dev.items()):
        if isinstance(metrics, dict):
            for metric, value in sorted(metrics.items()):
                if _number(value):
                    scalars[f"candidate/dev/{task}/{metric}"] = float(value)
    for name in ("merge_s", "eval_s"):
        value = getattr(row, name)
        if value is not None:
            scalars[f"candidate/{name}"] = float(value)
    # Only rows with a keep/reject decision; a search or baseline row has none.
    if row.status != Status.SCORED:
        scalars["candidate/accepted"] = 1.0 if row.status == Status.ACCEPTED else 0.0
    return scalars


def generation_scalars(stats: dict) -> dict[str, float]:
    """A generation row's numbers; its strings (a stop reason) and Nones are left out."""
    return {f"generation/{k}": float(v) for k, v in sorted(stats.items()) if _number(v)}


def table_rows(markdown: str) -> Optional[tuple[list[str], list[list[Any]]]]:
    """The final markdown table as header and rows, or None where it is not
    one table of equal rows. A column of numbers only is numbers; any other
    stays text, since a wandb Table refuses a column of mixed types."""
    lines = [line.strip() for line in markdown.splitlines() if line.strip().startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    cells = [row for row in cells if not all(c and set(c) <= set(":-") for c in row)]
    if len(cells) < 2 or any(len(row) != len(cells[0]) for row in cells):
        return None
    header, rows = cells[0], cells[1:]

    def number(cell: str) -> Optional[float]:
        try:
            value = float(cell)
        except ValueError:
            return None
        return value if math.isfinite(value) else None

    numeric = [all(number(row[j]) is not None for row in rows) for j in range(len(header))]
    return header, [[number(c) if numeric[j] else c for j, c in enumerate(row)] for row in rows]


class Observer:
    """What both loggers share: the counters kept in the run dir, and the
    guard that turns a failure into one warning and switches the logger off."""

    label = "observer"

    def __init__(self, run_dir: Path, log: Log):
        self.log = log
        self.state_path = logs_dir(run_dir) / f"{self.label}.json"
        self.state = self._read_state()
        self.off = False
        self.finished = False

    def _read_state(self) -> dict:
        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            state = {}
        state.setdefault("candidates", 0)
        state.setdefault("generations", [])
        return state

    def _write_state(self) -> None:
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, sort_keys=True), encoding="utf-8")
        tmp.replace(self.state_path)

    def _guard(self, what: str, call: Callable[[], None]) -> None:
        if self.off:
            return
        try:
            call()
        except Exception as error:
            self.off = True
            warn(self.log, f"logging.{self.label} failed in {what} ({one_line(error)}); the run goes on without it")

    # -- what Run.notify calls ------------------------------------------------
    def candidate(self, row: Candidate) -> None:
        def log() -> None:
            index = self.state["candidates"]
            # Counted before it is written: a run killed in between leaves a
            # gap in the numbering, never two points at one number.
            self.state["candidates"] = index + 1
            self._write_state()
            self.log_candidate(index, row)

        self._guard("candidate", log)

    def generation(self, number: int, stats: dict) -> None:
        if number in self.state["generations"]:
            return  # a resume ending a recorded generation again

        def log() -> None:
            self.state["generations"].append(number)
            self._write_state()
            self.log_generation(number, stats)

        self._guard("generation", log)

    def finish(self, table: str) -> None:
        def log() -> None:
            self.log_finish(table)
            self.finished = True

        self._guard("finish", log)

    def close(self) -> None:
        # Shut even after a failure, so no writer or wandb process outlives
        # the run; a logger that failed before has said so once already.
        try:
            self.shut()
        except Exception as error:
            if not self.off:
                warn(self.log, f"logging.{self.label} failed in close ({one_line(error)})")
        self.off = True

    # -- what each logger does ------------------------------------------------
    def log_candidate(self, index: int, row: Candidate) -> None:
        raise NotImplementedError

    def log_generation(self, number: int, stats: dict) -> None:
        raise NotImplementedError

    def log_finish(self, table: str) -> None:
        raise NotImplementedError

    def shut(self) -> None:
        raise NotImplementedError


class WandbObserver(Observer):
    label = "wandb"

    def __init__(self, settings, config, run_dir: Path, log: Log):
        super().__init__(run_dir, log)
        import wandb

        self.wandb = wandb
        # wandb adds a wandb/ of its own: its files land in <run_dir>/logs/wandb.
        directory = logs_dir(run_dir)
        directory.mkdir(parents=True, exist_ok=True)
        if "run_id" not in self.state:
            self.state["run_id"] = new_run_id()
            self._write_state()
        self.run = wandb.init(
            project=settings.project,
            entity=settings.entity,
            name=settings.name or Path(run_dir).name,
            tags=list(settings.tags) or None,
            mode=settings.mode,
            dir=str(directory),
            id=self.state["run_id"],
            resume="allow",
            config={"config_digest": config.digest(), **config.model_dump(mode="json")},
            # create_new: a wandb run the caller already has stays untouched.
            # console off: the run's own lines stay on the terminal as they are.
            reinit="create_new",
            settings=wandb.Settings(console="off"),
        )
        self.run.define_metric("candidate/index")
        self.run.define_metric("candidate/*", step_metric="candidate/index")
        self.run.define_metric("generation/number")
        self.run.define_metric("generation/*", step_metric="generation/number")

    def log_candidate(self, index: int, row: Candidate) -> None:
        self.run.log({
            "candidate/index": index,
            **candidate_scalars(row),
            "candidate/status": str(row.status),
            "candidate/role": str(row.role),
            "candidate/step": row.step,
        })

    def log_generation(self, number: int, stats: dict) -> None:
        self.run.log({"generation/number": number, **generation_scalars(stats)})

    def log_finish(self, table: str) -> None:
        self.run.summary["final/table_markdown"] = table
        parsed = table_rows(table)
        if parsed is not None:
            columns, rows = parsed
            self.run.log({"final/table": self.wandb.Table(columns=columns, data=rows)})

    def shut(self) -> None:
        # A run that did not reach its table (killed, failed) is marked so in
        # wandb; a resume continues the same run id.
        self.run.finish(exit_code=0 if self.finished else 1)


class TensorBoardObserver(Observer):
    label = "tensorboard"

    def __init__(self, settings, run_dir: Path, log: Log):
        super().__init__(run_dir, log)
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(settings.log_dir) if settings.log_dir else logs_dir(run_dir) / "tensorboard"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def log_candidate(self, index: int, row: Candidate) -> None:
        for tag, value in candidate_scalars(row).items():
            self.writer.add_scalar(tag, value, global_step=index)
        # Flushed per event: a killed run's log holds what its ledger holds.
        self.writer.flush()

    def log_generation(self, number: int, stats: dict) -> None:
        for tag, value in generation_scalars(stats).items():
            self.writer.add_scalar(tag, value, global_step=number)
        self.writer.flush()

    def log_finish(self, table: str) -> None:
        # TensorBoard's text plugin renders markdown, tables included.
        self.writer.add_text("final/table", table, global_step=self.state["candidates"])
        self.writer.flush()

    def shut(self) -> None:
        self.writer.close()


def one_line(error: BaseException) -> str:
    return " ".join((str(error) or type(error).__name__).split())


def warn(log: Log, message: str) -> None:
    log(f"warning: {message}")


def observers_from_config(config, run_dir: Path, log: Log) -> list:
    """The loggers config.logging asks for, each started; one that cannot
    start is a warning, and the others go on."""
    settings = config.logging
    observers: list = []
    wanted: list[tuple[str, str, Callable[[], Observer]]] = []
    if settings.wandb is not None:
        wanted.append(("wandb", "wandb", lambda: WandbObserver(settings.wandb, config, run_dir, log)))
    if settings.tensorboard is not None:
        wanted.append(("tensorboard", "tensorboard", lambda: TensorBoardObserver(settings.tensorboard, run_dir, log)))
    for label, package, make in wanted:
        try:
            observers.append(make())
        except ImportError as error:
            warn(log, f"logging.{label} is off: cannot import {package} ({one_line(error)}); install it with {INSTALL_HINT}")
        except Exception as error:
            warn(log, f"logging.{label} is off: it could not start ({one_line(error)})")
    return observers
