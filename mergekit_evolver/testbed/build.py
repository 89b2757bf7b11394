"""Build (or reuse) a testbed: base model, one specialist per family, their uniform
average through mergekit, lm-eval tasks, and a table of every model's test scores.

Layout of ``out_dir``::

    data/<family>_{dev,test}.jsonl    the items (absolute paths in the YAMLs)
    tasks/tb_<family>_{dev,test}.yaml lm-eval tasks: tasks/ is the include_path
    models/base, models/spec_<family>, models/average, models/multitask
                                      HF model dirs (safetensors)
    manifest.json                     written last, atomically: spec, paths, scores

A directory with a manifest for the same spec and version is reused as is; one
without (half built, or built from another spec) is rebuilt, deleting only the
entries above inside ``out_dir``.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from mergekit_evolver.testbed.families import get_family, make_splits, mixture_texts, training_texts
from mergekit_evolver.testbed.lmeval_tasks import task_name, write_tasks
from mergekit_evolver.testbed.properties import check_properties, format_table, property_summary
from mergekit_evolver.testbed.spec import FULL, TestbedSpec
from mergekit_evolver.testbed.store import MANIFEST, Testbed, load_testbed, spec_name, write_manifest

# torch, transformers, mergekit and lm-eval are imported where a build needs
# them, so that reusing a built testbed stays quick.

_OWNED = (MANIFEST, "data", "tasks", "models")  # the manifest goes first


def build_testbed(
    out_dir: str | os.PathLike,
    spec: TestbedSpec = FULL,
    *,
    reuse: bool = True,
    log: Callable[[str], None] | None = print,
) -> Testbed:
    """Build the testbed described by `spec` in `out_dir` (or reuse it) and print its table.

    Raises `TestbedPropertyError` (after writing the models, before the manifest)
    if `spec.check_properties` and the models do not make a fair merging problem.
    """
    log = log or (lambda _msg: None)
    root = Path(out_dir).resolve()
    if reuse:
        found = load_testbed(root, spec)
        if found is not None:
            log(f"testbed: reusing {root} (spec {spec.name!r})")
            log(found.table_text)
            return found
    with _quiet_hf():
        return _build(root, spec, log)


def _build(root: Path, spec: TestbedSpec, log: Callable[[str], None]) -> Testbed:
    from mergekit_evolver.scoring.lmeval import forget_task_manager
    from mergekit_evolver.testbed.tokenizer import build_tokenizer
    from mergekit_evolver.testbed.train import (
        cpu_training_env,
        derive_seed,
        init_model,
        model_config,
        train,
    )

    t0 = time.perf_counter()
    _clear(root)
    root.mkdir(parents=True, exist_ok=True)
    paths = _layout(root, spec)
    all_families = spec.families + spec.ood_families

    splits = {
        f: make_splits(get_family(f), spec.seed, spec.str_len, spec.n_dev, spec.n_test)
        for f in all_families
    }
    write_tasks(splits, root / "data", paths["include_path"])
    forget_task_manager(paths["include_path"])  # a stale index may list other tasks
    held_out = {item["input"] for s in splits.values() for items in s.values() for item in items}
    tokenizer = build_tokenizer()
    cfg = model_config(
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_layers=spec.num_layers,
        num_heads=spec.num_heads,
    )

    with cpu_training_env():
        base = init_model(cfg, derive_seed(spec.seed, "base", "init"))
        log(f"testbed: training base ({sum(p.numel() for p in base.parameters()):,} parameters)")
        mix = [get_family(f) for f in spec.families]
        if spec.generic_share or spec.base_weights:
            base_texts = mixture_texts(
                mix, spec.base_weights, spec.generic_share, spec.seed, spec.str_len, "base", held_out
            )
        else:
            base_texts = training_texts(mix, spec.seed, spec.str_len, "base", held_out)
        train(
            base,
            base_texts,
            steps=spec.base_steps,
            batch_size=spec.batch_size,
            lr=spec.base_lr,
            warmup=spec.base_warmup,
        )
        _save(base, tokenizer, paths["base"])
        for fam in spec.families:
            log(f"testbed: training specialist {fam!r}")
            model = copy.deepcopy(base)
            train(
                model,
                training_texts([get_family(fam)], spec.seed, spec.str_len, fam, held_out),
                steps=spec.specialist_steps,
                batch_size=spec.batch_size,
                lr=spec.specialist_lr,
                warmup=spec.specialist_warmup,
            )
            _save(model, tokenizer, paths["specialists"][fam])
        if spec.multitask:
            log("testbed: training the multi-task reference")
            model = copy.deepcopy(base)
            train(
                model,
                training_texts(mix, spec.seed, spec.str_len, "multitask", held_out),
                steps=spec.specialist_steps * len(spec.families),
                batch_size=spec.batch_size,
                lr=spec.specialist_lr,
                warmup=spec.specialist_warmup,
            )
            _save(model, tokenizer, paths["multitask"])
    t_train = time.perf_counter() - t0

    log("testbed: merging the uniform average with mergekit (linear)")
    merge_uniform_average(list(paths["specialists"].values()), paths["average"])
    # mergekit copied a donor's tokenizer; saving ours makes it match the others byte for byte.
    tokenizer.save_pretrained(paths["average"])
    t_merge = time.perf_counter() - t0 - t_train

    log("testbed: scoring every model on every test task with lm-eval")
    tasks = [task_name(f, "test") for f in all_families]
    models = {"base": paths["base"], **{spec_name(f): p for f, p in paths["specialists"].items()}}
    models["average"] = paths["average"]
    if spec.multitask:
        models["multitask"] = paths["multitask"]
    with cpu_training_env():
        scores = {
            name: score_dir(path, tasks, paths["include_path"], batch_size=spec.eval_batch_size)
            for name, path in models.items()
        }
    t_eval = time.perf_counter() - t0 - t_train - t_merge
    table = format_table(scores, spec)
    timing = (
        f"built in {time.perf_counter() - t0:.1f} s "
        f"(train {t_train:.1f}, merge {t_merge:.1f}, eval {t_eval:.1f})"
    )
    table_text = f"{table}\n{property_summary(scores, spec)}\n{timing}"
    log(table_text)
    if spec.check_properties:
        check_properties(scores, spec)

    testbed = Testbed(
        root=root,
        spec=spec,
        include_path=paths["include_path"],
        base=paths["base"],
        specialists=dict(paths["specialists"]),
        average=paths["average"],
        multitask=paths["multitask"] if spec.multitask else None,
        families=spec.families,
        ood_families=spec.ood_families,
        scores=scores,
        table_text=table_text,
    )
    write_manifest(testbed)
    return testbed


@contextlib.contextmanager
def _quiet_hf():
    """transformers' progress bars and warnings off during a build; restored afterwards."""
    import logging

    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    level = hf_logging.get_verbosity()
    mk = logging.getLogger("mergekit")
    mk_level = mk.level
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    mk.setLevel(logging.ERROR)
    try:
        yield
    finally:
        mk.setLevel(mk_level)
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _layout(root: Path, spec: TestbedSpec) -> dict:
    models = root / "models"
    return {
        "include_path": root / "tasks",
        "base": models / "base",
        "specialists": {f: models / spec_name(f) for f in spec.families},
        "average": models / "average",
        "multitask": models / "multitask",
    }


def _clear(root: Path) -> None:
    """Delete what a build owns inside `root` (manifest first), nothing else."""
    for name in _OWNED:
        path = root / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def _save(model, tokenizer, path: Path) -> None:
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def merge_uniform_average(models: list[Path], out: Path) -> None:
    """The uniform average of `models` through mergekit's real merge path (linear)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    config = MergeConfiguration.model_validate(
        {
            "merge_method": "linear",
            "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models],
            "dtype": "float32",
            "out_dtype": "float32",
        }
    )
    options = MergeOptions(copy_tokenizer=True, quiet=True, write_model_card=True, device="cpu")
    run_merge(config, str(out), options)


def score_dir(path: Path, tasks: list[str], include_path: Path, *, batch_size: int = 64) -> dict[str, float]:
    """Test accuracy of the model saved in `path` on `tasks` (through fitness.score_model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_evolver.scoring.lmeval import score_model

    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(path)
    results = score_model(model, tokenizer, tasks, include_path=include_path, batch_size=batch_size)
    return {t: results[t]["acc"] for t in tasks}
