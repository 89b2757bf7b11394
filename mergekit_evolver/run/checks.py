"""The checks at the door: everything a run needs is checked before its run
dir is made, and these only look (nothing is created or changed)."""

from __future__ import annotations

from pathlib import Path

from mergekit_evolver.errors import UserError
from mergekit_evolver.ledger import LEDGER_FILE
from mergekit_evolver.ledger.store import SETUP_DEBRIS, read_meta
from mergekit_evolver.population.store import architecture, check_same_shapes, tensor_shapes


def check_models(config) -> None:
    """Same architecture and tensor shapes everywhere, or one line saying where not."""
    paths = list(config.population.models)
    if config.population.base_model:
        paths.append(config.population.base_model)
    for path in paths:
        if not Path(path).is_dir():
            raise UserError(f"model path not found: {path}")
        if not (Path(path) / "config.json").is_file():
            raise UserError(f"not a HF model dir (no config.json): {path}")
    for ref in config.report.references:
        if not (Path(ref.model) / "config.json").is_file():
            raise UserError(f"report.references {ref.name!r}: not a HF model dir (no config.json): {ref.model}")
        paths.append(ref.model)
    first = paths[0]
    arch, shapes = architecture(Path(first)), tensor_shapes(Path(first))
    for path in paths[1:]:
        if architecture(Path(path)) != arch:
            raise UserError(
                f"models differ in architecture: {first} is {arch}, "
                f"{path} is {architecture(Path(path))}"
            )
        check_same_shapes(Path(first), Path(path), shapes)


def check_run_dir(run_dir: Path, config, resume: bool) -> None:
    """A new run needs an empty or absent dir, or one whose run never started
    (killed while it was set up: a resume starts it again); a resume needs
    this run's dir."""
    ledger = run_dir / LEDGER_FILE
    if ledger.exists():
        digest = read_meta(run_dir, "config_digest")
        if digest != config.digest():
            raise UserError(f"{run_dir} holds another run (its config differs); choose another --out")
        if not resume:
            raise UserError(f"{run_dir} already holds this run; pass --resume to continue it")
        return
    held = {p.name for p in run_dir.iterdir()} if run_dir.is_dir() else set()
    if held and held <= SETUP_DEBRIS:
        return
    if resume:
        raise UserError(f"nothing to resume: {run_dir} holds no run")
    if held:
        raise UserError(f"{run_dir} is not empty and holds no run; choose another --out")


def check_filters(filters, model: Path) -> None:
    """A recipe-search filter names part of a tensor name (mergekit's filter);
    one that matches no tensor gives no genome coordinates anything to do."""
    names = tensor_shapes(model)
    for pattern in filters:
        if not any(pattern in name for name in names):
            raise UserError(f"search.filters: {pattern!r} matches no tensor of {model} (e.g. {sorted(names)[0]})")


def check_finite(model_dir: Path) -> None:
    """The check every offspring gets, for a model that enters the run from
    outside: a member with NaN scores like any other (argmax of NaN
    log-likelihoods picks choice 0) and could become the output. One tensor
    at a time, so it holds one tensor, not the model."""
    from safetensors import safe_open

    from mergekit_evolver.merging.fingerprint import first_non_finite
    from mergekit_evolver.population.store import require_safetensors

    for shard in require_safetensors(model_dir):
        with safe_open(str(shard), framework="pt") as handle:
            for name in handle.keys():
                if first_non_finite({name: handle.get_tensor(name)}) is not None:
                    raise UserError(f"{model_dir}: tensor {name} holds NaN or Inf; every model of a run must be finite")
