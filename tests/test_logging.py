"""Experiment logging (config `logging:`, run/observers.py): what wandb and
TensorBoard hold after a run, read back with each tool's own formats and
compared with the ledger they mirror; resumes; and a run that goes on when a
logger is missing or fails."""

from __future__ import annotations

import inspect
import json
import struct
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import mergekit_evolver.run.context as context
from mergekit_evolver.cli import main
from mergekit_evolver.config import EvolveConfig
from mergekit_evolver.ledger import Candidate, Ledger, Role, Status
from mergekit_evolver.run import evolve
from mergekit_evolver.run.observers import TensorBoardObserver, WandbObserver, observers_from_config
from toy_world import run_config

pytest.importorskip("wandb")
pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from wandb.proto import wandb_internal_pb2  # noqa: E402


@pytest.fixture(autouse=True)
def wandb_offline(tmp_path, monkeypatch):
    """wandb offline and quiet, with every file it keeps outside a run's dir
    (cache, config, artifacts) under this test's tmp_path."""
    root = tmp_path / "wandb_home"
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(root / var.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.fixture
def observed(monkeypatch):
    """Runs whose observers come from their config. Run._set_up is wrapped to
    fill them until it does so itself; once it does, the wrapper stands aside
    (two sets of loggers would open the wandb run twice)."""
    original = context.Run._set_up
    if "observers_from_config" in inspect.getsource(original):
        return

    def set_up(self, config):
        original(self, config)
        self.observers = observers_from_config(config, self.run_dir, self.log)

    monkeypatch.setattr(context.Run, "_set_up", set_up)


# -- reading back what the loggers wrote --------------------------------------
def tensorboard_events(log_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = tensorboard_events(log_dir)
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def tensorboard_text(log_dir: Path, tag: str) -> list[str]:
    events = tensorboard_events(log_dir)
    return [e.tensor_proto.string_val[0].decode() for e in events.Tensors(f"{tag}/text_summary")]


def wandb_records(path: Path) -> list:
    """The records of a .wandb transaction log. wandb 0.31 has no Python
    reader for it (its Go core writes it); the format is LevelDB's log: a
    7-byte file header, then 32 KiB blocks of records, each a 7-byte header
    (checksum, length, kind: 1 full, 2 first, 3 middle, 4 last) and its bytes."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb transaction log"
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block  # a block's tail too short for a header is padding
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def finished_records(run: Path, timeout: float = 60.0) -> list:
    """The records of an offline wandb run once its exit record is on disk:
    wandb-core writes the log from its own process and may still be writing
    when run.finish() has returned."""
    (log,) = run.glob("run-*.wandb")
    deadline = time.monotonic() + timeout
    while True:
        try:
            records = wandb_records(log)
        except Exception:  # caught mid-write: a record cut short
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        if time.monotonic() > deadline:
            raise AssertionError(f"{log}: no exit record after {timeout} s")
        time.sleep(0.05)


def items(entries) -> dict:
    return {e.key or "/".join(e.nested_key): json.loads(e.value_json) for e in entries}


def wandb_runs(run_dir: Path) -> list[Path]:
    """The offline wandb runs of a run dir, oldest first (one per session)."""
    return sorted((run_dir / "logs" / "wandb").glob("offline-run-*"))


def wandb_history(run_dir: Path) -> list[dict]:
    rows = []
    for run in wandb_runs(run_dir):
        rows += [items(r.history.item) for r in finished_records(run) if r.WhichOneof("record_type") == "history"]
    return rows


def wandb_run_record(run: Path):
    return next(r.run for r in finished_records(run) if r.WhichOneof("record_type") == "run")


def series(rows: list[dict], key: str, step: str) -> list[tuple[int, float]]:
    return [(row[step], row[key]) for row in rows if key in row]


# -- configs and rows -----------------------------------------------------------
def paper_config(tmp_path: Path, **logging) -> EvolveConfig:
    """A config the observers can start from; nothing here opens its models."""
    return EvolveConfig.model_validate({
        "population": {"models": [str(tmp_path / f"m{i}") for i in range(4)]},
        "fitness": {"tasks": ["toy_dev"]},
        "logging": logging,
    })


def row(step: str, fitness, status=Status.ACCEPTED, acc=0.5, generation=1, **extra) -> Candidate:
    dev = {"toy_dev": {"acc": acc, "acc_stderr": 0.01, "alias": "toy_dev"}}
    return Candidate(step=step, generation=generation, role=Role.OFFSPRING, status=status, fitness=fitness,
                     dev=dev, merge_s=0.25, eval_s=1.5, **extra)


ROWS = [
    row("g001/s00", 0.5, acc=0.5),
    row("g001/s01", 0.25, Status.REJECTED, acc=0.25),
    Candidate(step="g001/s02", generation=1, role=Role.OFFSPRING, status=Status.INVALID, merge_s=0.125),
]
STATS = {"best": 0.5, "mean": 0.375, "min": 0.25, "accepted": 1, "evaluated": 3, "kinship": None,
         "stopped": "mean kinship 0.9 >= 0.8", "seconds": 2.5}
TABLE = (
    "| model | dev fitness | ood |\n|-------|-------------|-----|\n"
    "| m0 | 0.4000 | - |\n| evolved | 0.5333 | 0.2500 |"
)


# -- the config section -------------------------------------------------------
def test_logging_section_is_strict_and_out_of_the_digest(tmp_path):
    plain = paper_config(tmp_path)
    logged = paper_config(tmp_path, wandb={"project": "p", "tags": ["a"]}, tensorboard=True)
    assert plain.logging.wandb is None and plain.logging.tensorboard is None
    assert logged.logging.tensorboard.log_dir is None
    assert logged.logging.wandb.mode == "offline"
    assert logged.digest() == plain.digest()
    assert paper_config(tmp_path, tensorboard=False).logging.tensorboard is None
    with pytest.raises(ValueError, match="logging.wandb.mode"):
        paper_config(tmp_path, wandb={"mode": "cloud"})


def test_a_misspelt_logging_key_is_one_line_and_no_run_dir(tmp_path):
    config = tmp_path / "c.yml"
    data = paper_config(tmp_path).model_dump(mode="json")
    data["logging"] = {"tensorboard": {"logdir": "x"}}
    config.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(main, ["evolve", str(config), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.output.strip() == "mergekit-evolver: error: logging.tensorboard.logdir: Extra inputs are not permitted"
    assert not (tmp_path / "out").exists()


# -- each logger, driven directly ---------------------------------------------
def test_tensorboard_holds_each_rows_numbers(tmp_path):
    run_dir = tmp_path / "run"
    lines: list[str] = []
    (observer,) = observers_from_config(paper_config(tmp_path, tensorboard=True), run_dir, lines.append)
    assert isinstance(observer, TensorBoardObserver)
    for r in ROWS:
        observer.candidate(r)
    observer.generation(1, STATS)
    observer.finish(TABLE)
    observer.close()
    assert lines == []
    got = scalars(run_dir / "logs" / "tensorboard")
    assert got["candidate/fitness"] == [(0, 0.5), (1, 0.25)]  # the invalid row has no fitness
    assert got["candidate/dev/toy_dev/acc"] == [(0, 0.5), (1, 0.25)]
    assert got["candidate/merge_s"] == [(0, 0.25), (1, 0.25), (2, 0.125)]
    assert got["candidate/accepted"] == [(0, 1.0), (1, 0.0), (2, 0.0)]
    assert got["generation/best"] == [(1, 0.5)]
    assert got["generation/seconds"] == [(1, 2.5)]
    # Strings and Nones of a generation row are no scalars.
    assert "generation/stopped" not in got and "generation/kinship" not in got
    assert tensorboard_text(run_dir / "logs" / "tensorboard", "final/table") == [TABLE]


def test_tensorboard_log_dir_from_the_config(tmp_path):
    elsewhere = tmp_path / "tb_elsewhere"
    (observer,) = observers_from_config(
        paper_config(tmp_path, tensorboard={"log_dir": str(elsewhere)}), tmp_path / "run", print
    )
    observer.candidate(ROWS[0])
    observer.close()
    assert scalars(elsewhere)["candidate/fitness"] == [(0, 0.5)]
    assert not (tmp_path / "run" / "logs" / "tensorboard").exists()


def test_wandb_offline_run_holds_each_rows_numbers(tmp_path):
    run_dir = tmp_path / "run"
    lines: list[str] = []
    config = paper_config(tmp_path, wandb={"project": "proj", "name": "toy", "tags": ["a", "b"]})
    (observer,) = observers_from_config(config, run_dir, lines.append)
    assert isinstance(observer, WandbObserver)
    for r in ROWS:
        observer.candidate(r)
    observer.generation(1, STATS)
    observer.finish(TABLE)
    observer.close()
    assert lines == []
    (run,) = wandb_runs(run_dir)
    record = wandb_run_record(run)
    state = json.loads((run_dir / "logs" / "wandb.json").read_text())
    assert (record.run_id, record.project, record.display_name, list(record.tags)) == (
        state["run_id"], "proj", "toy", ["a", "b"],
    )
    assert run.name.endswith("-" + state["run_id"])
    history = wandb_history(run_dir)
    assert series(history, "candidate/fitness", "candidate/index") == [(0, 0.5), (1, 0.25)]
    assert series(history, "candidate/dev/toy_dev/acc", "candidate/index") == [(0, 0.5), (1, 0.25)]
    assert series(history, "candidate/status", "candidate/index") == [(0, "accepted"), (1, "rejected"), (2, "invalid")]
    assert series(history, "generation/mean", "generation/number") == [(1, 0.375)]
    # The final table: as a wandb Table and as markdown. A column of numbers
    # is numbers; one with a gap ("-") stays text, as wandb wants one type.
    (table_file,) = (run / "files").rglob("*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["model", "dev fitness", "ood"]
    assert table["data"] == [["m0", 0.4, "-"], ["evolved", 0.5333, "0.2500"]]
    summary = {}
    for r in finished_records(run):
        if r.WhichOneof("record_type") == "summary":
            summary.update(items(r.summary.update))
    assert summary["final/table_markdown"] == TABLE


def test_a_resume_continues_the_numbering_in_one_wandb_run(tmp_path):
    run_dir = tmp_path / "run"
    config = paper_config(tmp_path, wandb={}, tensorboard=True)
    first = observers_from_config(config, run_dir, print)
    for observer in first:
        observer.candidate(ROWS[0])
        observer.candidate(ROWS[1])
        observer.generation(1, STATS)
        observer.close()  # killed here: no finish
    second = observers_from_config(config, run_dir, print)
    for observer in second:
        observer.generation(1, STATS)  # the loop ends a replayed generation again
        observer.candidate(row("g002/s00", 0.75, generation=2))
        observer.generation(2, {**STATS, "best": 0.75})
        observer.close()
    got = scalars(run_dir / "logs" / "tensorboard")
    assert got["candidate/fitness"] == [(0, 0.5), (1, 0.25), (2, 0.75)]
    assert got["generation/best"] == [(1, 0.5), (2, 0.75)]
    runs = wandb_runs(run_dir)
    assert len(runs) == 2
    assert len({wandb_run_record(r).run_id for r in runs}) == 1
    # Both sessions sync into one wandb run; the first is marked unfinished.
    history = wandb_history(run_dir)
    assert series(history, "candidate/fitness", "candidate/index") == [(0, 0.5), (1, 0.25), (2, 0.75)]
    assert series(history, "generation/best", "generation/number") == [(1, 0.5), (2, 0.75)]


def test_a_logger_that_fails_midway_warns_once_and_the_others_go_on(tmp_path):
    run_dir = tmp_path / "run"
    lines: list[str] = []
    wandb_observer, tb_observer = observers_from_config(
        paper_config(tmp_path, wandb={}, tensorboard=True), run_dir, lines.append
    )
    wandb_observer.run.finish()  # gone from under the observer: logging to it raises
    for observer in (wandb_observer, tb_observer):
        for r in ROWS:
            observer.candidate(r)
        observer.finish(TABLE)
        observer.close()
    assert len(lines) == 1
    assert lines[0].startswith("warning: logging.wandb failed in candidate (")
    assert lines[0].endswith("); the run goes on without it")
    assert "\n" not in lines[0]
    assert scalars(run_dir / "logs" / "tensorboard")["candidate/merge_s"] == [(0, 0.25), (1, 0.25), (2, 0.125)]


def test_a_logger_that_cannot_start_is_a_warning(tmp_path):
    blocked = tmp_path / "a_file"
    blocked.write_text("not a dir")
    lines: list[str] = []
    observers = observers_from_config(
        paper_config(tmp_path, tensorboard={"log_dir": str(blocked)}), tmp_path / "run", lines.append
    )
    assert observers == []
    assert len(lines) == 1 and lines[0].startswith("warning: logging.tensorboard is off: it could not start (")


# -- whole runs ---------------------------------------------------------------
def tiny(world, **overrides) -> dict:
    return run_config(world, de__generations=1, report={"tasks": [], "baselines": []}, **overrides)


def loop_rows(ledger: Ledger) -> list[Candidate]:
    """The rows the candidate loop computed, in the order it recorded them."""
    return [c for c in ledger.candidates() if c.role == Role.OFFSPRING]


def test_a_run_logs_what_its_ledger_holds(shared_world, tmp_path, observed):
    out = tmp_path / "run"
    config = EvolveConfig.model_validate(tiny(shared_world, logging={"wandb": {"project": "toy"}, "tensorboard": True}))
    lines: list[str] = []
    table = evolve(config, out, log=lines.append)
    assert not [line for line in lines if line.startswith("warning:")]
    ledger = Ledger(out)
    rows, generations = loop_rows(ledger), ledger.generations()
    assert len(rows) == 4 and [g["generation"] for g in generations] == [0, 1]
    want_fitness = [(i, r.fitness) for i, r in enumerate(rows)]
    want_acc = [(i, r.dev["toy_dev"]["acc"]) for i, r in enumerate(rows)]
    want_best = [(g["generation"], g["best"]) for g in generations]

    tb_dir = out / "logs" / "tensorboard"
    got = scalars(tb_dir)
    assert got["candidate/fitness"] == [(i, pytest.approx(f, rel=1e-6)) for i, f in want_fitness]
    assert got["candidate/dev/toy_dev/acc"] == [(i, pytest.approx(a, rel=1e-6)) for i, a in want_acc]
    assert got["candidate/eval_s"] == [(i, pytest.approx(r.eval_s, rel=1e-6)) for i, r in enumerate(rows)]
    assert got["candidate/accepted"] == [(i, float(r.status == Status.ACCEPTED)) for i, r in enumerate(rows)]
    assert got["generation/best"] == [(g, pytest.approx(b, rel=1e-6)) for g, b in want_best]
    assert tensorboard_text(tb_dir, "final/table") == [table]

    history = wandb_history(out)
    assert series(history, "candidate/fitness", "candidate/index") == want_fitness
    assert series(history, "candidate/dev/toy_dev/acc", "candidate/index") == want_acc
    assert series(history, "candidate/step", "candidate/index") == [(i, r.step) for i, r in enumerate(rows)]
    assert series(history, "generation/best", "generation/number") == want_best

    # Logging changes no result: the same run without it records the same rows.
    bare = tmp_path / "bare"
    evolve(EvolveConfig.model_validate(tiny(shared_world)), bare, log=lambda _: None)
    same = [(r.step, r.status, r.fitness, r.content_hash) for r in Ledger(bare).candidates()]
    assert same == [(r.step, r.status, r.fitness, r.content_hash) for r in ledger.candidates()]

    # A resume of the finished run replays every candidate: nothing new is
    # logged, no generation twice, and wandb keeps the one run id.
    evolve(config, out, resume=True, log=lines.append)
    again = scalars(tb_dir)
    assert again["candidate/fitness"] == got["candidate/fitness"]
    assert again["generation/best"] == got["generation/best"]
    assert series(wandb_history(out), "candidate/fitness", "candidate/index") == want_fitness
    runs = wandb_runs(out)
    assert len(runs) == 2 and len({wandb_run_record(r).run_id for r in runs}) == 1


def test_a_missing_package_is_one_warning_and_the_run_goes_on(shared_world, tmp_path, monkeypatch, observed):
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    out = tmp_path / "run"
    config = EvolveConfig.model_validate(tiny(shared_world, logging={"wandb": {}, "tensorboard": {}}))
    lines: list[str] = []
    table = evolve(config, out, log=lines.append)
    warnings = [line for line in lines if "warning" in line]
    assert len(warnings) == 2
    for line, name, package in zip(warnings, ("wandb", "tensorboard"), ("wandb", "tensorboard")):
        assert line.startswith(f"warning: logging.{name} is off: cannot import {package} (")
        assert line.endswith("install it with pip install 'mergekit-evolver[logging]'")
        assert "\n" not in line
    assert Ledger(out).get_meta("status") == "complete"
    assert "evolved" in table
    assert not (out / "logs" / "wandb").exists() and not (out / "logs" / "tensorboard").exists()
