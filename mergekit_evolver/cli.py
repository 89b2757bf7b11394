"""The `mergekit-evolver` command line."""

from __future__ import annotations

import sys
from importlib.resources import files
from pathlib import Path
from typing import Optional

import click
from mergekit.options import MergeOptions, PrettyPrintHelp, add_merge_options

import mergekit_evolver  # noqa: F401  (registers the plugin's merge methods)
from mergekit_evolver.errors import UserError, exits_cleanly, fail
from mergekit_evolver.kinship.metrics import METRICS

# One dir per kind, so switching kinds never rebuilds over another kind's testbed
# (or resumes a demo run over models that changed under it).
DEFAULT_TESTBED = Path(".testbed")
DEFAULT_DEMO_RUN = Path("runs/demo")
DEFAULT_KIND = "merge_friendly"
TESTBED_KINDS = ("merge_friendly", "disjoint", "fusion")


def testbed_spec(kind: str, width: Optional[int], layers: Optional[int]):
    from mergekit_evolver.testbed.spec import PRESETS

    try:
        return PRESETS[kind].sized(width, layers)
    except ValueError as exc:
        raise UserError(str(exc)) from None
# Package data, so a wheel install has it too.
DEMO_CONFIG = Path(str(files("mergekit_evolver") / "examples" / "demo.yml"))


class OneLineUsage(click.Group):
    """click prints a usage error as three lines (Usage, Try, Error); every
    other bad input here is one line naming the problem, exit code 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:
            e.show()  # the help text, as click gives it
            sys.exit(e.exit_code)
        except click.UsageError as e:
            where = f"{e.ctx.command_path}: " if e.ctx is not None else ""
            fail(f"{where}{e.format_message()} (see --help)")
        except click.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=OneLineUsage, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(mergekit_evolver.__version__, prog_name="mergekit-evolver")
def main() -> None:
    """Evolutionary search over mergekit merges, scored with lm-evaluation-harness."""


@main.command("yaml", cls=PrettyPrintHelp)
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.argument("out_path", type=click.Path(file_okay=False))
@add_merge_options
@exits_cleanly(debug=lambda kwargs: kwargs["merge_options"].verbosity > 0)
def yaml_command(merge_options: MergeOptions, config_file: str, out_path: str) -> None:
    """mergekit-yaml with the plugin's merge methods (de_rand1, ...) available.

    Same options and same output as mergekit-yaml. Bad input ends in one line
    and exit code 2; pass -v for the full traceback."""
    from mergekit_evolver.merging.merge import merge_to_disk
    from mergekit_evolver.recipes.parse import load_merge_config

    merge_options.apply_global_options()
    config, source = load_merge_config(config_file)
    merge_to_disk(config, out_path, merge_options, config_source=source)


@main.command("evolve")
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.option("--out", "run_dir", required=True, type=click.Path(file_okay=False), help="Run dir: ledger, population, model, report.")
@click.option("--resume", is_flag=True, help="Continue the run already in --out.")
@click.option("-v", "--verbose", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.option("--max-fevals", type=click.IntRange(min=1), help="mergekit-evolve configs: candidates to score (default 100).")
@click.option("--random-seed", type=click.IntRange(min=0), help="mergekit-evolve configs: the seed (default 0).")
@click.option("--sigma0", type=click.FloatRange(min=0, min_open=True), help="mergekit-evolve configs: CMA-ES initial sigma (default 1/6).")
@click.option("--batch-size", type=click.IntRange(min=1), help="mergekit-evolve configs: evaluation batch size.")
@click.option("--task-search-path", multiple=True, type=click.Path(file_okay=False), help="mergekit-evolve configs: folders of local lm-eval tasks.")
@click.option("allow_benchmarks", "--i-understand-the-depths-of-the-evils-i-am-unleashing", is_flag=True,
              help="mergekit-evolve configs: allow selecting on public benchmark tasks.")
@exits_cleanly(debug=lambda kwargs: kwargs["verbose"])
def evolve_command(config_file: str, run_dir: str, resume: bool, verbose: bool, **evolve_flags) -> None:
    """Run the search in CONFIG_FILE: the Evolver (DE over whole models),
    kinship-guided greedy merging, or DE / CMA-ES over a mergekit recipe's
    parameters. A mergekit-evolve config (genome:, tasks:) is accepted as it is.

    Selection sees dev tasks only; the final table is on the report tasks.
    A run killed at any point continues with --resume to the same result."""
    from mergekit_evolver.config import load_evolve_config
    from mergekit_evolver.run import evolve

    from tqdm import tqdm

    config = load_evolve_config(config_file, evolve_flags)
    # tqdm.write keeps log lines from tearing the progress bars.
    evolve(config, Path(run_dir), resume=resume, log=tqdm.write)


@main.command("report")
@click.argument("run_dir", type=click.Path(file_okay=False))
@exits_cleanly()
def report_command(run_dir: str) -> None:
    """Print a run's result table and save its plots under RUN_DIR/report."""
    from mergekit_evolver.report.render import report_from_run_dir

    click.echo(report_from_run_dir(Path(run_dir)))


_kind_option = click.option(
    "--kind", type=click.Choice(TESTBED_KINDS), default=DEFAULT_KIND, show_default=True,
    help="merge_friendly: a pretrained base and light fine-tunes (merging keeps skills); "
         "disjoint: specialists learnt from scratch (merging cannot fuse); "
         "fusion: sources of different architectures and tokenizers for `fuse`.",
)
_width_option = click.option("--width", type=int, default=None, help="Hidden size (MLP 4x, 16-dim heads); default 64.")
_layers_option = click.option("--layers", type=int, default=None, help="Transformer layers; default 2.")


@main.command("testbed")
@click.argument("out_dir", type=click.Path(file_okay=False), required=False)
@_kind_option
@_width_option
@_layers_option
@click.option("--rebuild", is_flag=True, help="Build again even if OUT_DIR holds a complete testbed.")
@exits_cleanly()
def testbed_command(out_dir: Optional[str], kind: str, width: Optional[int], layers: Optional[int], rebuild: bool) -> None:
    """Train a CPU testbed (base, specialists, multi-task reference, lm-eval
    tasks) into OUT_DIR (default .testbed/KIND).

    Deterministic; reuses a complete testbed already in OUT_DIR unless --rebuild."""
    out = Path(out_dir) if out_dir else DEFAULT_TESTBED / kind
    if kind == "fusion":
        if width is not None or layers is not None:
            raise UserError("--width and --layers apply to the merge_friendly and disjoint kinds, not fusion")
        from mergekit_evolver.fusion.testbed import build_fusion_testbed

        build_fusion_testbed(out, reuse=not rebuild)
        return
    from mergekit_evolver.testbed import build_testbed

    build_testbed(out, testbed_spec(kind, width, layers), reuse=not rebuild)


@main.command("demo")
@click.option(
    "--kind", type=click.Choice(TESTBED_KINDS[:2]), default=DEFAULT_KIND, show_default=True,
    help="The testbed to evolve (see `mergekit-evolver testbed --help`).",
)
@click.option(
    "--testbed",
    "testbed_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Where the testbed is built or reused [default: .testbed/KIND].",
)
@click.option(
    "--out",
    "run_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Run dir; a finished demo there is reused and its table reprinted [default: runs/demo/KIND].",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    default=str(DEMO_CONFIG),
    show_default=True,
    help="The run config; ${TESTBED} in it is the testbed dir.",
)
@exits_cleanly()
def demo_command(kind: str, testbed_dir: Optional[str], run_dir: Optional[str], config_file: str) -> None:
    """The main job on the embedded testbed: build (or reuse) it, evolve its
    specialists with the packaged examples/demo.yml, and print the comparison table on the
    held-out test and out-of-domain tasks, and a one-line verdict."""
    import os

    from tqdm import tqdm

    from mergekit_evolver.config import load_evolve_config
    from mergekit_evolver.ledger import LEDGER_FILE
    from mergekit_evolver.run import evolve
    from mergekit_evolver.testbed import build_testbed

    testbed_dir = testbed_dir or str(DEFAULT_TESTBED / kind)
    run_dir = run_dir or str(DEFAULT_DEMO_RUN / kind)
    build_testbed(Path(testbed_dir), testbed_spec(kind, None, None), reuse=True)
    os.environ["TESTBED"] = str(Path(testbed_dir).resolve())
    config = load_evolve_config(config_file)
    resume = (Path(run_dir) / LEDGER_FILE).exists()
    click.echo(f"\nEvolving the testbed specialists ({config_file}) in {run_dir}")
    evolve(config, Path(run_dir), resume=resume, log=tqdm.write)


@main.command("kinship", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("models", nargs=-1, type=click.Path(file_okay=False))
@click.option("--base", "base", type=click.Path(file_okay=False), default=None,
              help="The base model every MODEL was derived from (required).")
@click.option("--metrics", "metrics", default=",".join(METRICS), show_default=True,
              help="Comma-separated metrics: pcc (Pearson correlation), cos (cosine similarity), "
                   "ed (Euclidean distance).")
@click.option("--json", "as_json", is_flag=True,
              help='Print a JSON list of {"a": MODEL, "b": MODEL, <metric>: value} (NaN as null).')
@exits_cleanly()
def kinship_command(models: tuple[str, ...], base: Optional[str], metrics: str, as_json: bool) -> None:
    """Kinship of every pair of MODELs: similarity of their deltas from --base.

    A model's delta is its weights minus the base's, all tensors flattened into
    one vector; the metrics are exact over that whole vector (not averaged per
    tensor) and are computed streaming, one tensor at a time, so models larger
    than memory work. MODEL and BASE are local dirs of safetensors weights.

    Rows beyond the shared vocabulary (embedding / lm_head of different sizes)
    are left out, and tensors missing from a model or the base are left out of
    the pairs that lack them; both are reported on stderr.

    \b
    Example:
      mergekit-evolver kinship m1 m2 m3 --base llama-base --metrics pcc,cos --json
    """
    from mergekit_evolver.kinship.metrics import compute_kinship, format_matrices, parse_metrics, to_json

    wanted = parse_metrics(metrics)
    if base is None:
        raise UserError("--base is required: the model every MODEL was fine-tuned from")
    if len(models) < 2:
        raise UserError(f"kinship needs at least 2 models; got {len(models)}")
    result = compute_kinship(list(models), base, wanted)
    for line in result.notes():
        click.echo(line, err=True)
    click.echo(to_json(result) if as_json else format_matrices(result))


@main.command("stats")
@click.argument("model", type=click.Path(file_okay=False))
@click.option("--data", "data", required=True, help="A .jsonl (\"text\" field) or .txt file (one example per line), or an lm-eval task name.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Stats dir to write (default location for merges: MODEL/stats).")
@click.option("--kind", "kind", default="gram,fisher", show_default=True, help="gram (RegMean), fisher (Fisher merging), or both.")
@click.option("--max-examples", type=int, default=None, help="Use at most N examples.")
@click.option("--include-path", multiple=True, help="Folder of lm-eval task YAMLs (repeatable).")
@click.option("--split", default=None, help="lm-eval split: train, validation or test (default: the first the task has).")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--max-length", type=int, default=512, show_default=True, help="Truncate examples to this many tokens.")
@click.option("--dtype", default="float32", show_default=True, help="Storage dtype: float32 or float64 (accumulation is float64 for Grams).")
@click.option("--device", default="auto", show_default=True, help="auto (cuda if available), cpu, cuda, ...")
@click.option("-v", "--verbose", is_flag=True, help="Show tracebacks instead of one-line errors.")
@exits_cleanly(debug=lambda kwargs: kwargs["verbose"])
def stats_command(model, data, out_dir, kind, max_examples, include_path, split, batch_size, max_length, dtype, device, verbose):
    """Collect the Gram (RegMean) and diagonal Fisher statistics of MODEL on --data.

    Padding tokens are excluded. Writes OUT_DIR/manifest.json plus
    gram.safetensors / fisher.safetensors, atomically. Merges with
    `merge_method: regmean` or `fisher` read MODEL/stats unless a model's
    `stats:` parameter names another dir."""
    from mergekit_evolver.stats.collect import SPLITS, Source, collect_to_dir, parse_kinds

    kinds = parse_kinds(kind)
    source = Source(data, tuple(include_path), split)
    if source.kind == "lm-eval" and split is not None and split not in SPLITS:
        raise UserError(f"--split must be one of {', '.join(SPLITS)}; got {split!r}")
    path, collected = collect_to_dir(
        model, source, out_dir, kinds=kinds, max_examples=max_examples,
        batch_size=batch_size, max_length=max_length, dtype=dtype, device=device,
    )
    click.echo(
        f"wrote {', '.join(kinds)} statistics of {model} "
        f"({collected.n_examples} examples, {collected.gram_tokens or collected.fisher_tokens} tokens) to {path}"
    )


@main.command("fuse")
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Fusion dir: work files and model/.")
@click.option("--resume", is_flag=True, help="Continue the fusion already in --out.")
@exits_cleanly()
def fuse_command(config_file: str, out_dir: str, resume: bool) -> None:
    """FuseLLM-style knowledge fusion: train the target on the sources'
    next-token distributions (different architectures and vocabularies)."""
    from mergekit_evolver.fusion import fuse

    click.echo(str(fuse(Path(config_file), Path(out_dir), resume=resume)))
