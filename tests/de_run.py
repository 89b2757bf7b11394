"""Run DE configs through the real `mergekit-evolver yaml` command."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from click.testing import CliRunner

from mergekit_evolver.cli import main


def write_config(
    path: Path, method: str, x: Path, donors: list[Path], *, references: tuple = (), **params: Any
) -> Path:
    """`references`: models listed after the donors with `reference: true`."""
    config = {
        "merge_method": method,
        "base_model": str(x),
        "models": [{"model": str(d)} for d in donors]
        + [{"model": str(r), "parameters": {"reference": True}} for r in references],
        "parameters": params,
        "dtype": params.pop("dtype", "float32"),
    }
    if "out_dtype" in params:
        config["out_dtype"] = params.pop("out_dtype")
    path.write_text(yaml.safe_dump(config))
    return path


def run_yaml(config: Path, out: Path, *extra: str):
    """Invoke the CLI in-process; returns click's Result (exit_code, output)."""
    args = ["yaml", str(config), str(out), "--no-copy-tokenizer", "--quiet", *extra]
    return CliRunner().invoke(main, args, catch_exceptions=False)


def wait_for_offspring(proc, run_dir: Path, n: int, timeout: float = 300) -> None:
    """Wait until the run in `proc` has recorded `n` offspring rows (to kill
    it mid-run), failing if it ends first."""
    import sqlite3
    import time

    ledger = run_dir / "ledger.sqlite"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if ledger.exists():
            try:
                done = sqlite3.connect(ledger).execute(
                    "SELECT COUNT(*) FROM candidates WHERE role='offspring'").fetchone()[0]
            except sqlite3.Error:
                done = 0
            if done >= n:
                break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
