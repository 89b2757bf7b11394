"""A weight-space evolution run: ask -> merge -> score -> tell -> ledger.

Every step has a stable key. A step whose decision is in the ledger is
replayed from it; any other step is computed. Since the computation is
deterministic, a run killed at any moment and resumed ends exactly where an
uninterrupted run does.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import yaml
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions
from tqdm import tqdm

from mergekit_evolver.config import EvolveConfig
from mergekit_evolver.errors import UserError
from mergekit_evolver.scoring.evaluator import Evaluator, Suite, check_chat_template, resolve_device
from mergekit_evolver.merging.fingerprint import content_hash, first_non_finite
from mergekit_evolver.ledger.store import LEDGER_FILE, Candidate, Ledger
from mergekit_evolver.merging.merge import merge_in_memory, merge_to_disk, recipe_yaml
from mergekit_evolver.merging.ahead import MergeAhead, Merged
from mergekit_evolver.population.store import (
    MemorySlot,
    architecture,
    load_state,
    read_from_files,
    tensor_shapes,
    write_individual,
)
from mergekit_evolver.recipes.candidates import (
    NEEDS_BASE,
    baseline_recipes,
    de_recipe,
    population_recipe,
    single_model_recipe,
)
from mergekit_evolver.search.evolver import Evolver

Log = Callable[[str], None]
CONFIG_FILE = "run.yml"
GENERATIONS_LOG = "generations.jsonl"


@dataclass
class Weights:
    """A merged candidate: its state (None when it holds NaN or Inf)."""

    state: Optional[dict[str, torch.Tensor]]
    merge_s: float
    invalid: Optional[str]
    content_hash: Optional[str]


@dataclass
class Member:
    id: str
    path: Path
    fitness: Optional[float] = None


def check_models(config: EvolveConfig) -> None:
    """Same architecture and tensor shapes everywhere, or one line saying where not."""
    paths = list(config.population.models)
    if config.population.base_model:
        paths.append(config.population.base_model)
    for path in paths:
        if not Path(path).is_dir():
            raise UserError(f"model path not found: {path}")
        if not (Path(path) / "config.json").is_file():
            raise UserError(f"not a HF model dir (no config.json): {path}")
    first = paths[0]
    arch, shapes = architecture(Path(first)), tensor_shapes(Path(first))
    for path in paths[1:]:
        if architecture(Path(path)) != arch:
            raise UserError(
                f"models differ in architecture: {first} is {arch}, "
                f"{path} is {architecture(Path(path))}"
            )
        other = tensor_shapes(Path(path))
        if set(other) != set(shapes):
            diff = sorted(set(other) ^ set(shapes))
            raise UserError(f"models differ in tensors: {first} vs {path}: {diff[:3]}")
        for name, shape in shapes.items():
            if other[name] != shape:
                raise UserError(
                    f"models differ in tensor shape: {name} is {list(shape)} in {first} "
                    f"but {list(other[name])} in {path}"
                )


def check_run_dir(run_dir: Path, config: EvolveConfig, resume: bool) -> None:
    """A new run needs an empty or absent dir; a resume needs this run's dir.
    Only looks: nothing in run_dir is created or changed."""
    ledger = run_dir / LEDGER_FILE
    if ledger.exists():
        theirs = Ledger(run_dir)
        digest = theirs.get_meta("config_digest")
        theirs.close()
        if digest != config.digest():
            raise UserError(f"{run_dir} holds another run (its config differs); choose another --out")
        if not resume:
            raise UserError(f"{run_dir} already holds this run; pass --resume to continue it")
        return
    if resume:
        raise UserError(f"nothing to resume: {run_dir} holds no run")
    if run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(f"{run_dir} is not empty and holds no run; choose another --out")


def write_generations_log(run_dir: Path, ledger: Ledger) -> None:
    """One JSON line per generation, rewritten from the ledger (so a resume
    never duplicates or loses a line), atomically."""
    path = run_dir / GENERATIONS_LOG
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(g) + "\n" for g in ledger.generations()), encoding="utf-8")
    tmp.replace(path)


class Run:
    def __init__(self, config: EvolveConfig, run_dir: Path, *, resume: bool = False, log: Log = print):
        self.config = config
        # Absolute, so every recorded recipe replays from any working directory.
        self.run_dir = Path(run_dir).resolve()
        self.log = log
        check_run_dir(self.run_dir, config, resume)
        check_models(config)
        settings = config.fitness
        self.options = MergeOptions(
            quiet=True,
            device=resolve_device(settings.device),
            trust_remote_code=settings.trust_remote_code,
            random_seed=config.seed,
        )
        # Started first, so that the worker's imports overlap loading tasks and the model.
        self.ahead = MergeAhead(self.options, enabled=config.merge_ahead)
        self.ahead.start()
        try:
            self._set_up(config, resume)
        except BaseException:
            self.ahead.close()
            raise

    def _set_up(self, config: EvolveConfig, resume: bool) -> None:
        settings = config.fitness
        self.dev = Suite(config.fitness.tasks, settings)
        self.report_suite = Suite(config.report.tasks, settings) if config.report.tasks else None
        check_chat_template(Path(config.population.models[0]), settings)
        self.genome = None
        if config.strategy == "recipe":
            from mergekit_evolver.run.recipe_search import build_genome, make_optimizer

            self.genome = build_genome(config)
            make_optimizer(config, self.genome)  # its settings are checked before anything is made
        # Generation numbers of a weight-space stage after a recipe search.
        self.generation_offset = 0
        # Everything the user gave us checked out: only now is the run dir made.
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(self.run_dir)
        if self.ledger.get_meta("config_digest") is None:
            (self.run_dir / CONFIG_FILE).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
            self.ledger.set_meta("config_digest", config.digest())
        self.like = Path(config.population.models[0])
        self.evaluator = Evaluator(self.like, settings, self.ledger)
        self.slot = MemorySlot(self.run_dir / "scratch", self.like)
        self.population_dir = self.run_dir / "population"
        self._recipe_memo = None

    # -- the pieces ---------------------------------------------------------
    def merge(self, recipe: MergeConfiguration) -> dict[str, torch.Tensor]:
        read_from_files(m for m in recipe.referenced_models() if m != self.slot.ref)
        return merge_in_memory(recipe, self.options)

    def expect(self, text: str) -> None:
        """The search will merge this recipe (its YAML) next: the merge-ahead
        worker makes it while the current candidate is scored."""
        self.ahead.expect(text)

    def merge_candidate(self, recipe: MergeConfiguration, step: str, text: Optional[str] = None) -> Weights:
        """A candidate's weights, timed: the merge-ahead worker's if it made this
        very recipe, else merged here. A candidate with NaN or Inf comes back
        with no state and a note (it is rejected and logged, and the run goes on)."""
        start = time.perf_counter()
        merged = self.ahead.take(text or recipe_yaml(recipe))
        if merged is None:
            state = self.merge(recipe)
            merged = Merged(state, content_hash(state), first_non_finite(state))
        seconds = time.perf_counter() - start
        if merged.non_finite is None:
            return Weights(merged.state, seconds, None, merged.content_hash)
        self.log(f"{step}: rejected, non-finite values in {merged.non_finite}")
        return Weights(None, seconds, f"non-finite: {merged.non_finite}", None)

    def materialize(self, recipe: MergeConfiguration, dest: Path, **options) -> Path:
        """Write a recipe's model to dest with mergekit's writer, atomically: a
        crash leaves at most a .partial dir that the next attempt replaces."""
        if not dest.exists():
            tmp = dest.with_name(dest.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            merge_to_disk(recipe, tmp, self.options.model_copy(update=options))
            tmp.rename(dest)
        return dest

    def score(
        self, state, suite: Suite, digest: Optional[str] = None
    ) -> tuple[Optional[float], dict, float, bool]:
        scored = self.evaluator.score(state, suite, digest)
        return suite.fitness(scored.scores), scored.scores, scored.seconds, scored.cached

    def step(self, key: str, compute: Callable[[], Candidate]) -> Candidate:
        done = self.ledger.find(key)
        if done is not None:
            return done
        # One transaction (one fsync) for the row and the scores it cached.
        with self.ledger.transaction():
            candidate = compute()
            self.ledger.record(candidate)
        return candidate

    # -- phases -------------------------------------------------------------
    def initial_members(self) -> list[Member]:
        members = [Member(f"m{i}", Path(p)) for i, p in enumerate(self.config.population.models)]
        for name, template in self.config.population.recipes.items():
            dest = self.population_dir / f"recipe_{name}"

            def build(template=template, dest=dest, name=name) -> Candidate:
                recipe = population_recipe(
                    template, [m.path for m in members], self.config.population.base_model,
                    where=f"population.recipes.{name}",
                )
                self.materialize(recipe, dest)
                return Candidate(
                    step=f"init/recipe/{name}", generation=0, role="member", status="accepted",
                    recipe=recipe_yaml(recipe), parents=[m.id for m in members], member=str(dest),
                )

            self.step(f"init/recipe/{name}", build)
            members.append(Member(f"recipe_{name}", dest))
        for i, member in enumerate(members):
            def evaluate(member=member, i=i) -> Candidate:
                fitness, scores, seconds, _ = self.score(load_state(member.path), self.dev)
                return Candidate(
                    step=f"init/{member.id}", generation=0, slot=i, role="member",
                    status="accepted", fitness=fitness, dev=scores, eval_s=seconds,
                    member=str(member.path),
                )

            member.fitness = self.step(f"init/{member.id}", evaluate).fitness
        return members

    def merged_fitness(self, paths: list[Path], key: str) -> Candidate:
        def compute() -> Candidate:
            recipe = self.merger_recipe(paths)
            start = time.perf_counter()
            state = self.merge(recipe)
            merge_s = time.perf_counter() - start
            fitness, scores, seconds, _ = self.score(state, self.dev)
            return Candidate(
                step=key, generation=0, role="merged", status="scored",
                recipe=recipe_yaml(recipe), fitness=fitness, dev=scores,
                merge_s=merge_s, eval_s=seconds,
            )

        return self.step(key, compute)

    def merger_recipe(self, paths: list[Path]) -> MergeConfiguration:
        """The merger over members in slot order; slot i keeps model i's stats."""
        return population_recipe(
            self.config.selection.merger, paths, self.config.population.base_model,
            where="selection.merger", stats=self.config.population.stats_dirs(),
        )

    def evolve(self, members: list[Member]) -> list[Member]:
        de, mode = self.config.de, self.config.selection.mode
        paths = {m.id: m.path for m in members}
        merged0 = None
        if mode == "merged":
            merged0 = self.merged_fitness([m.path for m in members], "g000/merged").fitness
        strategy = Evolver(
            [m.id for m in members], [m.fitness for m in members],
            operator=de.operator, mode=mode, generations=de.generations,
            seed=self.config.seed, merged_fitness=merged0,
        )
        # Always, on resume too: its kinship table steers generation 1's donors.
        self.end_generation(0, strategy, 0.0, paths)
        total = de.generations * len(members)
        generations = tqdm(total=de.generations, desc="generations", unit="gen", position=0)
        bar = tqdm(total=total, desc="candidates", unit="cand", leave=False, position=1)
        gen_start = time.perf_counter()
        while (proposal := strategy.ask()) is not None:
            candidate = self.step(proposal.step, lambda p=proposal: self.offspring(p, strategy, paths))
            member_id = f"g{proposal.generation:03d}_s{proposal.slot:02d}"
            if candidate.status == "accepted":
                paths[member_id] = Path(candidate.member)
            strategy.tell(
                proposal,
                candidate.fitness if candidate.status != "invalid" else None,
                member_id,
            )
            bar.update(1)
            if strategy.slot == 0:
                self.end_generation(proposal.generation, strategy, time.perf_counter() - gen_start, paths)
                generations.update(1)
                gen_start = time.perf_counter()
        bar.close()
        generations.close()
        return [
            Member(mid, paths[mid], fit) for mid, fit in zip(strategy.members, strategy.fitness)
        ]

    def offspring_recipe(self, proposal, paths: dict[str, Path]) -> tuple[MergeConfiguration, str]:
        """An offspring's recipe and its YAML. The one asked for ahead (see
        expect_next) is kept, since each is built twice."""
        members = (proposal.target, *proposal.donors)
        key = (proposal, tuple(paths[m] for m in members))
        if self._recipe_memo is not None and self._recipe_memo[0] == key:
            return self._recipe_memo[1]
        de = self.config.de
        recipe = de_recipe(
            proposal.operator, paths[proposal.target], [paths[d] for d in proposal.donors],
            de.method_parameters(proposal.seed),
            reference=self.config.population.base_model if de.space == "task_vectors" else None,
        )
        self._recipe_memo = (key, (recipe, recipe_yaml(recipe)))
        return self._recipe_memo[1]

    def expect_next(self, strategy: Evolver, proposal, paths: dict[str, Path]) -> None:
        """Have the merge-ahead worker make the offspring after this one while
        this one is scored. Within a generation the next offspring does not
        depend on this one's fate; across a generation boundary the guess is
        that this one is rejected (a wrong guess is merged again, here)."""
        if not self.ahead.enabled:
            return
        after = copy.deepcopy(strategy)
        after.tell(proposal, None, "")
        upcoming = after.ask()
        if upcoming is None or self.ledger.find(upcoming.step) is not None:
            return
        if upcoming.generation != proposal.generation and self.config.kinship.needed:
            return  # kinship at the generation's end may stop the search or steer donors
        self.expect(self.offspring_recipe(upcoming, paths)[1])

    def offspring(self, proposal, strategy: Evolver, paths: dict[str, Path]) -> Candidate:
        de = self.config.de
        recipe, text = self.offspring_recipe(proposal, paths)
        base = dict(
            step=proposal.step, generation=proposal.generation, slot=proposal.slot,
            role="offspring", recipe=text,
            parents=[proposal.target, *proposal.donors], operator=proposal.operator,
            F=de.F, CR=de.CR, seed=proposal.seed,
        )
        weights = self.merge_candidate(recipe, proposal.step, text)
        self.expect_next(strategy, proposal, paths)
        if weights.invalid:
            return Candidate(**base, status="invalid", merge_s=weights.merge_s, note=weights.invalid)
        state, merge_s, digest = weights.state, weights.merge_s, weights.content_hash
        if self.config.selection.mode == "merged":
            ref = self.slot.serve(state)
            trial = [paths[m] for m in strategy.members]
            trial[proposal.slot] = Path(ref.model.path)
            start = time.perf_counter()
            scored_state = self.merge(self.merger_recipe(trial))
            merge_s += time.perf_counter() - start
            self.slot.clear()
            digest = None
        else:
            scored_state = state
        fitness, scores, seconds, _ = self.score(scored_state, self.dev, digest)
        accepted = strategy.accepts(proposal, fitness)
        member = None
        if accepted:
            dest = self.population_dir / f"g{proposal.generation:03d}_s{proposal.slot:02d}"
            member = str(write_individual(state, dest, like=paths[proposal.target]))
        return Candidate(
            **base, status="accepted" if accepted else "rejected", fitness=fitness,
            dev=scores, member=member, merge_s=merge_s, eval_s=seconds,
        )

    def population_kinship(self, strategy: Evolver, paths: dict[str, Path]) -> Optional[dict]:
        """Pairwise kinship of the current members, or None when not asked for."""
        settings = self.config.kinship
        if not settings.needed:
            return None
        from mergekit_evolver.kinship.metrics import pairwise_kinship

        ids = list(dict.fromkeys(strategy.members))
        pairs = pairwise_kinship(
            [paths[m] for m in ids], self.config.population.base_model, metrics=(settings.metric,)
        )
        by_path = {str(paths[m]): m for m in ids}
        return {
            tuple(sorted((by_path[str(p["a"])], by_path[str(p["b"])]))): p[settings.metric]
            for p in pairs
        }

    def end_generation(
        self, generation: int, strategy: Evolver, seconds: float, paths: dict[str, Path]
    ) -> None:
        fits = strategy.fitness
        rows = self.ledger.candidates("offspring", generation=generation)
        stats = {
            "best": max(fits),
            "mean": sum(fits) / len(fits),
            "min": min(fits),
            "accepted": sum(c.status == "accepted" for c in rows),
            "invalid": sum(c.status == "invalid" for c in rows),
            "evaluated": len(rows),
            "members": list(strategy.members),
            "merged": strategy.best_merged,
            "seconds": round(seconds, 3),
        }
        kinship = self.population_kinship(strategy, paths)
        if kinship is not None:
            values = [v for v in kinship.values() if v == v]  # NaN: a delta with no variance
            stats["kinship"] = sum(values) / len(values) if values else None
            if self.config.kinship.diverse_donors:
                strategy.set_kinship(kinship)
            limit = self.config.kinship.stop_above
            if limit is not None and stats["kinship"] is not None and stats["kinship"] >= limit:
                stats["stopped"] = f"mean kinship {stats['kinship']:.4f} >= {limit}"
                strategy.stop()
        self.ledger.record_generation(self.generation_offset + generation, stats)
        write_generations_log(self.run_dir, self.ledger)
        self.log(
            f"generation {generation}: best {stats['best']:.4f} mean {stats['mean']:.4f} "
            f"min {stats['min']:.4f}, accepted {stats['accepted']}/{stats['evaluated']}"
        )


class Finish:
    """After the search: baselines, the final model, held-out report, lineage."""

    def __init__(self, run: Run):
        self.run = run

    def baselines(self, inputs: list[Path]) -> list[tuple[str, MergeConfiguration, float]]:
        run, chosen = self.run, []
        base = run.config.population.base_model
        for name in run.config.report.baselines:
            if name in NEEDS_BASE and not base:
                run.log(f"baseline {name} skipped: population.base_model is not set")
                continue
            best = None
            stats = run.config.population.stats_dirs()
            for k, recipe in enumerate(baseline_recipes(name, inputs, base, stats)):
                def compute(recipe=recipe, k=k) -> Candidate:
                    state = run.merge(recipe)
                    fitness, scores, seconds, _ = run.score(state, run.dev)
                    return Candidate(
                        step=f"baseline/{name}/{k}", generation=0, role="baseline",
                        status="scored", recipe=recipe_yaml(recipe), fitness=fitness,
                        dev=scores, eval_s=seconds, note=name,
                    )

                c = run.step(f"baseline/{name}/{k}", compute)
                if best is None or c.fitness > best[2]:
                    best = (name, recipe, c.fitness)
            chosen.append(best)
        return chosen

    def final_recipe(self, members: list[Member]) -> MergeConfiguration:
        run = self.run
        if run.config.output.kind == "merged":
            return run.merger_recipe([m.path for m in members])
        best = max(range(len(members)), key=lambda i: (members[i].fitness, -i))
        return single_model_recipe(members[best].path)

    def write_model(self, recipe: MergeConfiguration) -> Path:
        run = self.run
        return run.materialize(recipe, run.run_dir / "model", copy_tokenizer=True)

    def report(self, entries: list[tuple[str, MergeConfiguration | Path]]) -> None:
        """Score each entry on the held-out suite; dev fitness rides along."""
        run = self.run
        for label, source in entries:
            def compute(label=label, source=source) -> Candidate:
                if isinstance(source, Path):
                    state, recipe = load_state(source), None
                else:
                    state, recipe = run.merge(source), recipe_yaml(source)
                fitness, dev, _, _ = run.score(state, run.dev)
                test = {}
                if run.report_suite is not None:
                    test = run.evaluator.score(state, run.report_suite).scores
                return Candidate(
                    step=f"report/{label}", generation=0, role="report", status="scored",
                    recipe=recipe, fitness=fitness, dev=dev, test=test, note=label,
                )

            run.step(f"report/{label}", compute)


@contextlib.contextmanager
def _long_lived_heap_frozen() -> Iterator[None]:
    """By the search, the model, tokenizer, lm-eval tasks and their requests
    are built, and they live until it ends: some 570K objects on the testbed,
    which each full cyclic collection walked again while candidates churned
    out garbage (1.7 s of a 25 s search). gc.freeze() keeps the collector off
    them; collected first so no garbage is frozen in, unfrozen afterwards."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def evolve(config: EvolveConfig, run_dir: Path, *, resume: bool = False, log: Log = print) -> str:
    """The whole run; returns the result table."""
    run = Run(config, run_dir, resume=resume, log=log)
    try:
        return _evolve(run, config, log)
    finally:
        run.ahead.close()


def _evolve(run: Run, config: EvolveConfig, log: Log) -> str:
    from mergekit_evolver.recipes.lineage import write_lineage
    from mergekit_evolver.report.render import model_card, write_report

    members = run.initial_members()
    final = None
    with _long_lived_heap_frozen():
        if config.strategy == "kinship_greedy":
            from mergekit_evolver.run.greedy import greedy_search

            final_members = greedy_search(run, members)
        elif config.strategy == "recipe":
            from mergekit_evolver.run.recipe_search import recipe_strategy

            final_members, final = recipe_strategy(run, members)
        else:
            final_members = run.evolve(members)
    finish = Finish(run)
    inputs = [Path(p) for p in config.population.models]
    baselines = finish.baselines(inputs)
    if final is None:
        final = finish.final_recipe(final_members)
    model_dir = finish.write_model(final)
    entries: list[tuple[str, MergeConfiguration | Path]] = [
        (Path(m.path).name if m.id.startswith("m") else m.id, m.path) for m in members
    ]
    entries += [(name, recipe) for name, recipe, _ in baselines]
    entries.append(("evolved", final))
    finish.report(entries)
    table = write_report(run.run_dir, run.ledger, config.report.tasks)
    write_lineage(run.run_dir, recipe_yaml(final), run.ledger)
    (model_dir / "README.md").write_text(
        model_card((run.run_dir / CONFIG_FILE).read_text(), table, recipe_yaml(final)),
        encoding="utf-8",
    )
    run.ledger.set_meta("status", "complete")
    log(table)
    return table
