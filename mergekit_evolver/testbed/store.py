"""The `Testbed` object and its manifest on disk.

``manifest.json`` is written last and atomically (temp file + rename) and holds
the spec, a format version, the model and task paths (relative to the testbed's
root) and the cached test scores and table, so reusing a testbed is instant.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mergekit_evolver.testbed.lmeval_tasks import task_name
from mergekit_evolver.testbed.spec import TestbedSpec

MANIFEST = "manifest.json"
VERSION = 2  # 2: the multi-task reference, testbed kinds


@dataclass(frozen=True)
class Testbed:
    """A built testbed. Paths are absolute; `scores[model][task]` is test accuracy."""

    __test__ = False

    root: Path
    spec: TestbedSpec
    include_path: Path
    base: Path
    specialists: dict[str, Path]
    average: Path
    multitask: Path | None  # the multi-task reference (an upper bound, never a member)
    families: tuple[str, ...]
    ood_families: tuple[str, ...]
    scores: dict[str, dict[str, float]]
    table_text: str

    def dev_task(self, family: str) -> str:
        self._known(family)
        return task_name(family, "dev")

    def test_task(self, family: str) -> str:
        self._known(family)
        return task_name(family, "test")

    def dev_tasks(self, *, ood: bool = False) -> list[str]:
        return [self.dev_task(f) for f in self.families + (self.ood_families if ood else ())]

    def test_tasks(self, *, ood: bool = True) -> list[str]:
        return [self.test_task(f) for f in self.families + (self.ood_families if ood else ())]

    def models(self) -> dict[str, Path]:
        """Every model of the table, by its row name."""
        return {
            "base": self.base,
            **{spec_name(f): p for f, p in self.specialists.items()},
            "average": self.average,
            **({"multitask": self.multitask} if self.multitask else {}),
        }

    def _known(self, family: str) -> None:
        if family not in self.families + self.ood_families:
            raise ValueError(
                f"unknown family {family!r}; this testbed has {list(self.families + self.ood_families)}"
            )


def spec_name(family: str) -> str:
    """The row / folder name of a family's specialist."""
    return f"spec_{family}"


def write_manifest(tb: Testbed) -> None:
    rel = lambda p: str(Path(p).relative_to(tb.root))  # noqa: E731
    data = {
        "version": VERSION,
        "spec": tb.spec.to_json(),
        "include_path": rel(tb.include_path),
        "base": rel(tb.base),
        "specialists": {f: rel(p) for f, p in tb.specialists.items()},
        "average": rel(tb.average),
        "multitask": rel(tb.multitask) if tb.multitask else None,
        "scores": tb.scores,
        "table_text": tb.table_text,
    }
    fd, tmp = tempfile.mkstemp(prefix=".manifest.", suffix=".tmp", dir=tb.root)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, tb.root / MANIFEST)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_testbed(out_dir: str | os.PathLike, spec: TestbedSpec | None = None) -> Testbed | None:
    """The testbed in `out_dir` if it is complete (and built from `spec`, when given), else None."""
    root = Path(out_dir).resolve()
    try:
        data = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if data.get("version") != VERSION:
        return None
    try:
        built = TestbedSpec.from_json(data["spec"])
    except (TypeError, ValueError, KeyError):
        return None
    if spec is not None and built != spec:
        return None
    tb = Testbed(
        root=root,
        spec=built,
        include_path=root / data["include_path"],
        base=root / data["base"],
        specialists={f: root / p for f, p in data["specialists"].items()},
        average=root / data["average"],
        multitask=root / data["multitask"] if data.get("multitask") else None,
        families=built.families,
        ood_families=built.ood_families,
        scores=data["scores"],
        table_text=data["table_text"],
    )
    complete = all((p / "model.safetensors").is_file() for p in tb.models().values()) and all(
        (tb.include_path / f"{t}.yaml").is_file() for t in tb.test_tasks() + tb.dev_tasks(ood=True)
    )
    return tb if complete else None
