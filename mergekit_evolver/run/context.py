"""A run's set-up and the primitives every phase uses: merge, score, and the
ledger step that makes each of them resumable.

Every step has a stable key. A step whose row is in the ledger is replayed
from it; any other step is computed. Since the computation is deterministic, a
run killed at any moment and resumed ends exactly where an uninterrupted run does.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import yaml
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions

from mergekit_evolver.errors import UserError
from mergekit_evolver.ledger import LEDGER_FILE, Candidate, Ledger, Role, Status
from mergekit_evolver.merging.fingerprint import content_hash, first_non_finite
from mergekit_evolver.merging.merge import StateDict, merge_to_disk
from mergekit_evolver.population.store import (
    MemorySlot,
    clean_population,
    load_state,
    read_json,
)
from mergekit_evolver.recipes.candidates import BASELINES_NEED_BASE, baseline_recipes, population_recipe
from mergekit_evolver.recipes.parse import parse_merge_config, recipe_yaml
from mergekit_evolver.run.checks import check_filters, check_finite, check_models, check_run_dir
from mergekit_evolver.run.executor import make_executor
from mergekit_evolver.run.observers import observers_from_config
from mergekit_evolver.scoring.evaluator import (
    Evaluator,
    Suite,
    check_chat_template,
    resolve_device,
)
from mergekit_evolver.scoring.racing import Bar, Order, Reference
from mergekit_evolver.scoring.subset import TaskSubset, stratified_subset
from mergekit_evolver.search.protocol import Start, Strategy
from mergekit_evolver.search.registry import STRATEGIES

Log = Callable[[str], None]
CONFIG_FILE = "run.yml"
DOCUMENTS = "documents/"  # ledger meta: an initial member's per-document dev values
# Ledger meta: the per-document dev values of a model statistical racing pairs
# candidates with (a member, by id; "merged": the best merged population;
# "accepted": the last accepted candidate kept by no one).
REFERENCE = "reference/"
BASE_IDENTITY = "identity/base_model"  # ledger meta: the base model's byte hash


@dataclass
class Member:
    id: str
    path: Path
    fitness: Optional[float] = None
    # Its identity (merging/identity.py): its byte hash when it entered the
    # run, or an accepted candidate's derived identity.
    content_id: Optional[str] = None


@dataclass
class Scored:
    fitness: Optional[float]  # raced out: the best it could still have reached
    scores: dict
    seconds: float
    content_hash: str
    complete: bool = True
    documents: Optional[tuple[int, int]] = None  # scored, of
    per_document: Optional[dict] = None  # task -> values in document order (a fresh full score)
    estimated: bool = False  # from the fitness subset (scoring/subset.py)


class Run:
    def __init__(self, config, run_dir: Path, *, resume: bool = False, log: Log = print):
        self.config = config
        # Absolute, so every recorded recipe replays from any working directory.
        self.run_dir = Path(run_dir).resolve()
        self.log = log
        check_run_dir(self.run_dir, config, resume)
        check_models(config)
        if not (self.run_dir / LEDGER_FILE).exists():
            # A fresh run: nothing of it exists yet to be refused after.
            for path in [*config.population.models, *filter(None, [config.population.base_model])]:
                check_finite(Path(path))
        settings = config.fitness
        self.options = MergeOptions(
            quiet=True,
            device=resolve_device(settings.device),
            trust_remote_code=settings.trust_remote_code,
            random_seed=config.seed,
        )
        self.executor = make_executor(config, self.run_dir, self.options, log)
        try:
            self._set_up(config)
        except BaseException:
            self.executor.close()
            raise

    def _set_up(self, config) -> None:
        settings = config.fitness
        self.dev = Suite(config.fitness.tasks, settings)
        # Drawn once the initial members are scored (fitness_subset).
        self.subset: Optional[dict[str, TaskSubset]] = None
        if settings.subset is not None and config.executor.kind != "in_process":
            # Ray workers score the full suite: estimates on the driver would break equality.
            raise UserError("fitness.subset runs with executor.kind in_process only, for now")
        if settings.subset is not None and not self.dev.raceable:
            raise UserError(
                "fitness.subset needs metrics with a per-document value in [0, 1] averaged by lm-eval's mean "
                "(acc, acc_norm, exact_match) and no fitness.function"
            )
        self.report_suite = Suite(config.report.tasks, settings) if config.report.tasks else None
        check_chat_template(Path(config.population.models[0]), settings)
        self.check_strategy()
        # Everything the user gave us checked out: only now is the run dir made.
        fresh = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            # Remote workers must see the run dir itself, so this waits for it.
            self.executor.open(self.run_dir, self.models_read())
        except BaseException:
            if fresh:
                shutil.rmtree(self.run_dir, ignore_errors=True)
            raise
        if not (self.run_dir / LEDGER_FILE).exists():
            path = self.run_dir / CONFIG_FILE
            tmp = path.with_name(CONFIG_FILE + ".tmp")
            tmp.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
            tmp.replace(path)
            # The commit point of the set-up: the ledger appears whole, with the run's identity.
            Ledger.create(self.run_dir, {"config_digest": config.digest()}).close()
        self.ledger = Ledger(self.run_dir)
        self.population_dir = self.run_dir / "population"
        for stray in clean_population(self.population_dir, (c.member for c in self.ledger.candidates() if c.member)):
            self.log(f"removed {stray}: left by a killed run, no ledger row refers to it")
        self.like = Path(config.population.models[0])
        self._base_identity: Optional[str] = None
        self.slot = MemorySlot(self.run_dir / "scratch", self.like)
        self.executor.in_memory.add(self.slot.ref)
        self.evaluator = Evaluator(self.like, settings, self.ledger)
        # Who hears of each recorded candidate, generation and the final table
        # (experiment loggers): each has candidate(row), generation(number,
        # stats), finish(table) and close(). The loop and the run call them.
        self.observers: list = observers_from_config(config, self.run_dir, self.log)

    def models_read(self) -> list[str]:
        """The model dirs every candidate may be merged from, outside the run
        dir (kept members are inside it, which the executor checks as a whole)."""
        pop = self.config.population
        return [*pop.models, *filter(None, [pop.base_model])]

    def notify(self, event: str, *args) -> None:
        for observer in self.observers:
            getattr(observer, event)(*args)

    def start(self, members: list[Member]) -> Start:
        layers = read_json(Path(self.config.population.models[0]) / "config.json").get("num_hidden_layers")
        return Start(
            self.config, tuple(m.id for m in members), tuple(m.fitness for m in members),
            tuple(str(m.path) for m in members), layers if isinstance(layers, int) else None,
        )

    def strategy(self, name: str, members: list[Member]) -> Strategy:
        return STRATEGIES[name](self.start(members))

    def check_strategy(self) -> None:
        """Build the strategy once on stand-in fitness, so that its settings and
        the recipes it checks at the door fail before the run dir exists."""
        pop = self.config.population
        names = [self.config.strategy] + (["evolver"] if self.config.strategy == "recipe" and self.config.search.hybrid else [])
        members = [Member(f"m{i}", Path(p), 0.0) for i, p in enumerate(pop.models)]
        for name in names:
            strategy = self.strategy(name, members)
            for data in getattr(strategy, "recipes_to_check", lambda: [])():
                parse_merge_config(data, where=f"{name} (default recipe)")
        models = [Path(p) for p in pop.models]
        for name, recipe in pop.recipes.items():
            self.population_recipe(recipe, models, name)
        if self.config.selection.mode == "merged" or self.config.output.kind == "merged":
            self.merger_recipe(models)
        for name in self.config.report.baselines:
            if name not in BASELINES_NEED_BASE or pop.base_model:
                baseline_recipes(name, models, pop.base_model, pop.stats_dirs())
        if self.config.strategy in ("recipe", "random"):
            check_filters(self.config.search.filters, models[0])

    # -- recipes over the run's models ----------------------------------------
    def merger_recipe(self, paths: list[Path]) -> MergeConfiguration:
        """The merger over members in slot order; slot i keeps model i's stats."""
        return population_recipe(
            self.config.selection.merger.template(), paths, self.config.population.base_model,
            where="selection.merger", stats=self.config.population.stats_dirs(),
        )

    def population_recipe(self, recipe, paths: list[Path], name: str) -> MergeConfiguration:
        return population_recipe(
            recipe.template(), paths, self.config.population.base_model, where=f"population.recipes.{name}",
        )

    # -- the primitives ---------------------------------------------------------
    def merge(self, recipe: MergeConfiguration) -> StateDict:
        return self.executor.merge(recipe)

    def score(
        self, state, suite: Optional[Suite] = None, digest: Optional[str] = None, bar: Optional[Bar] = None,
        estimate: bool = False,
    ) -> Scored:
        """`estimate`: on the fitness subset only (where one is configured)."""
        suite = suite or self.dev
        subset = self.subset if estimate else None
        scored = self.evaluator.score(state, suite, digest, bar, subset)
        fitness = suite.fitness(scored.scores) if scored.complete else scored.best
        return Scored(
            fitness, scored.scores, scored.seconds, scored.content_hash, scored.complete, scored.documents,
            scored.per_document, scored.estimated,
        )

    def step(self, key: str, compute: Callable[[], Candidate]) -> Candidate:
        done = self.ledger.find(key)
        if done is not None:
            return done
        # One transaction (one fsync) for the row and the scores it cached.
        with self.ledger.transaction():
            candidate = compute()
            self.ledger.record(candidate)
        return candidate

    def materialize(self, recipe: MergeConfiguration, dest: Path, **options) -> Path:
        """Write a recipe's model to dest with mergekit's writer, atomically: a
        crash leaves at most a .partial dir that the next attempt replaces."""
        if not dest.exists():
            tmp = dest.with_name(dest.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            merge_to_disk(recipe, tmp, self.options.model_copy(update=options))
            tmp.rename(dest)
        return dest

    def scored_recipe(self, key: str, recipe: MergeConfiguration, role: Role, note: Optional[str] = None) -> Candidate:
        """A fixed recipe merged and scored on dev (a baseline's grid point)."""

        def compute() -> Candidate:
            start = time.perf_counter()
            state = self.merge(recipe)
            merge_s = time.perf_counter() - start
            s = self.score(state)
            return Candidate(
                step=key, generation=0, role=role, status=Status.SCORED, recipe=recipe_yaml(recipe),
                fitness=s.fitness, dev=s.scores, merge_s=merge_s, eval_s=s.seconds, note=note,
                content_hash=s.content_hash,
            )

        return self.step(key, compute)

    # -- the starting population ----------------------------------------------
    def initial_members(self) -> list[Member]:
        config = self.config
        members = [Member(f"m{i}", Path(p)) for i, p in enumerate(config.population.models)]
        for name, spec in config.population.recipes.items():
            dest = self.population_dir / f"recipe_{name}"

            def build(spec=spec, dest=dest, name=name) -> Candidate:
                recipe = self.population_recipe(spec, [m.path for m in members], name)
                self.materialize(recipe, dest)
                return Candidate(
                    step=f"init/recipe/{name}", generation=0, role=Role.MEMBER, status=Status.ACCEPTED,
                    recipe=recipe_yaml(recipe), parents=[m.id for m in members], member=str(dest),
                )

            self.step(f"init/recipe/{name}", build)
            members.append(Member(f"recipe_{name}", dest))
        for i, member in enumerate(members):
            def evaluate(member=member, i=i) -> Candidate:
                state = load_state(member.path)
                # The models were checked at the door; a population.recipes
                # member is a merge, which can still come out non-finite.
                bad = first_non_finite(state)
                if bad is not None:
                    raise UserError(f"{member.path}: tensor {bad} holds NaN or Inf; every model of a run must be finite")
                s = self.score(state)
                if s.per_document is not None:
                    # Kept for the racing order and the subset's strata, so a
                    # resume races and draws as the first run did.
                    self.ledger.set_meta(DOCUMENTS + member.id, json.dumps(s.per_document))
                self.keep_reference(member.id, s)
                return Candidate(
                    step=f"init/{member.id}", generation=0, slot=i, role=Role.MEMBER,
                    status=Status.ACCEPTED, fitness=s.fitness, dev=s.scores, eval_s=s.seconds,
                    member=str(member.path), content_hash=s.content_hash,
                )

            replayed = self.ledger.find(f"init/{member.id}") is not None
            row = self.step(f"init/{member.id}", evaluate)
            if replayed:
                self.check_unchanged(member.path, row.content_hash)
            member.fitness, member.content_id = row.fitness, row.content_hash
        self.dev.race_in(self.racing_order(members))
        self.subset = self.fitness_subset(members)
        return members

    # -- identities (merging/identity.py) ------------------------------------------
    def check_unchanged(self, path: Path, recorded: Optional[str]) -> None:
        """Candidates' identities derive from their inputs' identities taken
        when the run started, so a resume must start from the same weights."""
        if recorded is not None and content_hash(load_state(path)) != recorded:
            raise UserError(f"{path}: its weights changed since this run started; resume with the models it started with")

    def model_identity(self, path: str) -> str:
        """An input model outside the population (the base model), named in a
        recipe by path: its byte hash, taken once and kept in the ledger."""
        base = self.config.population.base_model
        if base is None or Path(path) != Path(base):
            return path
        if self._base_identity is None:
            recorded = self.ledger.get_meta(BASE_IDENTITY)
            if recorded is None:
                recorded = content_hash(load_state(Path(base)))
                self.ledger.set_meta(BASE_IDENTITY, recorded)
            else:
                self.check_unchanged(Path(base), recorded)
            self._base_identity = recorded
        return self._base_identity

    # -- statistical racing's references ---------------------------------------
    @property
    def pairs(self) -> bool:
        """Whether references are kept: statistical racing's paired test and
        the subset's difference estimate use them."""
        return self.config.fitness.racing.mode == "statistical" or self.config.fitness.subset is not None

    def keep_reference(self, key: str, scored: Scored) -> None:
        """Keep a fresh full score's per-document values as reference `key`
        (written in the caller's transaction, so a resume finds what the row says)."""
        if self.pairs and scored.complete and scored.per_document is not None and not scored.estimated:
            self.ledger.set_meta(REFERENCE + key, json.dumps(scored.per_document))

    def reference(self, key: str) -> Optional[Reference]:
        value = self.ledger.get_meta(REFERENCE + key) if self.pairs else None
        return None if value is None else Reference.of(json.loads(value))

    def forget_references(self, members: Sequence[str]) -> None:
        """Drop the references of members that left the population (none ever
        comes back): what is kept stays bounded by the population's size, plus
        "merged" and "accepted". Only the leavers are named, so that a resume,
        replaying an early generation's end, keeps what later ones added."""
        for member in members:
            self.ledger.delete_meta(REFERENCE + member)

    def initial_documents(self, members: list[Member]) -> list[dict]:
        """The initial members' per-document dev values (members scored from
        the cache, e.g. an exact copy of another, have none)."""
        return [json.loads(v) for v in (self.ledger.get_meta(DOCUMENTS + m.id) for m in members) if v]

    def racing_order(self, members: list[Member]) -> Optional[Order]:
        """Exact racing (and `off`, which must chunk as it does) scores the
        documents the initial members did worst on first. Statistical racing
        keeps the seeded order: its test takes the seen documents as a random
        sample."""
        rows = self.initial_documents(members)
        if self.config.fitness.racing.mode == "statistical" or not rows:
            return None
        return self.dev.hardest_first(rows)

    def fitness_subset(self, members: list[Member]) -> Optional[dict[str, TaskSubset]]:
        """Each fitness task's subset, stratified on the initial members'
        per-document values (members scored from the cache, e.g. an exact copy
        of another, have none and are left out of the strata)."""
        wanted = self.config.fitness.subset
        if wanted is None:
            return None
        rows = self.initial_documents(members)
        if not rows:
            raise UserError("fitness.subset: no initial member has per-document scores to stratify on")
        return {
            spec.name: stratified_subset([r[spec.name] for r in rows], wanted.share, seed=self.config.seed * 1000 + k)
            for k, spec in enumerate(self.config.fitness.tasks)
        }

    def close(self) -> None:
        try:
            for observer in getattr(self, "observers", []):
                observer.close()
        finally:
            self.executor.close()


