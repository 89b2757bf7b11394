"""The bad-input battery's cases (tests/test_battery.py runs them).

Each case builds one command line in its own tmp dir and names the substring
its one error line must hold. A case whose product behaviour is wrong today
carries `xfail`: the reason says what is wrong, and the test is a strict xfail,
so it turns into a failure the day the product is fixed (drop the reason then).
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import yaml

from toy_world import ToyWorld, run_config, save_model

# --------------------------------------------------------------------- models


@dataclass(frozen=True)
class Broken:
    """Models and files that are wrong in one way each, built once per module
    under `root` (read only afterwards, like the shared world)."""

    root: Path
    wide: Path  # hidden 48 instead of 32: every tensor shape differs
    deeper: Path  # 3 layers instead of 2: other tensor names
    other_arch: Path  # config.json says MistralForCausalLM
    no_config: Path  # weights and tokenizer, no config.json
    a_file: Path  # a plain file where a model dir is expected
    empty_dir: Path  # a dir with nothing in it
    pickled: Path  # pytorch_model.bin only (a harmless pickle; never opened)
    truncated: Path  # model.safetensors cut short
    broken_json: Path  # config.json that is not JSON
    nan: Path  # one tensor full of NaN
    no_chat: Path  # tokenizer without a chat template
    text: Path  # a small .txt data file for stats
    blank: Path  # a .txt data file with only blank lines
    no_text_field: Path  # a .jsonl data file without "text"


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def build_broken(root: Path, world: ToyWorld) -> Broken:
    from safetensors.torch import load_file, save_file

    m0, m1 = world.models[0], world.models[1]
    wide = save_model(root / "wide", seed=5, hidden=48)
    deeper = save_model(root / "deeper", seed=6, layers=3)
    other_arch = _copy(m1, root / "other_arch")
    cfg = json.loads((other_arch / "config.json").read_text())
    cfg["architectures"] = ["MistralForCausalLM"]
    (other_arch / "config.json").write_text(json.dumps(cfg))
    no_config = _copy(m1, root / "no_config")
    (no_config / "config.json").unlink()
    a_file = root / "a_file"
    a_file.write_text("not a model\n")
    empty_dir = root / "empty_dir"
    empty_dir.mkdir()
    pickled = _copy(m0, root / "pickled")
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": [0.0]}))
    truncated = _copy(m1, root / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    broken_json = _copy(m1, root / "broken_json")
    (broken_json / "config.json").write_text('{"model_type": "llama",\n  "hidden_size": 32,,\n}')
    nan = _copy(m0, root / "nan")
    tensors = load_file(nan / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"].fill_(float("nan"))
    save_file(tensors, str(nan / "model.safetensors"), metadata={"format": "pt"})
    no_chat = _copy(m0, root / "no_chat")
    (no_chat / "chat_template.jinja").unlink(missing_ok=True)
    tok = json.loads((no_chat / "tokenizer_config.json").read_text())
    tok.pop("chat_template", None)
    (no_chat / "tokenizer_config.json").write_text(json.dumps(tok))
    text = root / "data.txt"
    text.write_text("rev:abcd=dcba\nrev:efgh=hgfe\n")
    blank = root / "blank.txt"
    blank.write_text("\n\n\n")
    no_text_field = root / "prompts.jsonl"
    no_text_field.write_text('{"prompt": "rev:abcd="}\n')
    return Broken(
        root=root, wide=wide, deeper=deeper, other_arch=other_arch, no_config=no_config,
        a_file=a_file, empty_dir=empty_dir, pickled=pickled, truncated=truncated,
        broken_json=broken_json, nan=nan, no_chat=no_chat, text=text, blank=blank,
        no_text_field=no_text_field,
    )


# ---------------------------------------------------------------- the context

Config = Union[str, dict]


@dataclass
class Ctx:
    """What a case builds its command from: the world, the broken models and
    its own tmp dir. `outs` are the dirs the command would write; one that
    does not exist before the command must not exist after it."""

    world: ToyWorld
    broken: Broken
    tmp: Path
    outs: list[Path] = field(default_factory=list)

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    # -- configs ------------------------------------------------------------
    def run(self, **overrides) -> dict:
        """A valid Evolver config, cheap to score: what each case breaks."""
        config = run_config(self.world, **overrides)
        config["fitness"] = {"limit": 4, **config["fitness"]}
        return config

    def recipe(self, **search) -> dict:
        settings = {"merge_method": "dare_ties", "layer_granularity": 1, "filters": ["mlp"],
                    "budget": 12, "population_size": 5, **search}
        return self.run(strategy="recipe", search=settings)

    def models(self, *paths) -> list[str]:
        return [str(p) for p in paths]

    def mergekit_evolve(self, **extra) -> dict:
        config = {
            "genome": {
                "models": self.models(*self.world.models),
                "merge_method": "task_arithmetic",
                "base_model": str(self.world.base),
                "layer_granularity": 1,
                "filters": ["self_attn"],
                "normalize": False,
            },
            "tasks": [{"name": "toy_dev", "weight": 1.0, "metric": "acc,none"}],
            "limit": 4,
            "num_fewshot": 0,
            "apply_chat_template": False,
        }
        for key, value in extra.items():
            section, _, name = key.partition("__")
            if name:
                config[section][name] = value
            else:
                config[section] = value
        return config

    def merge(self, method: str = "de_rand1", base: Optional[Path] = None, donors=None, **params) -> dict:
        """A mergekit YAML for the `yaml` command (a DE offspring by default)."""
        donors = self.world.models[1:4] if donors is None else donors
        config = {
            "merge_method": method,
            "models": [{"model": str(d)} for d in donors],
            "parameters": {"seed": 1, "F": 0.5, "CR": 0.5, **params},
            "dtype": "float32",
        }
        config["base_model"] = str(self.world.models[0] if base is None else base)
        return config

    def linear(self, *models) -> dict:
        return {
            "merge_method": "linear", "dtype": "float32",
            "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in models],
        }

    def write(self, name: str, config: Config) -> Path:
        path = self.tmp / name
        path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
        return path

    # -- command lines ------------------------------------------------------
    def watch(self, out: Path) -> Path:
        self.outs.append(out)
        return out

    def evolve(self, config: Config, *flags: str, out: Optional[Path] = None) -> list[str]:
        out = self.watch(out or self.out)
        return ["evolve", str(self.write("run.yml", config)), "--out", str(out), *flags]

    def yaml(self, config: Config, *flags: str, out: Optional[Path] = None) -> list[str]:
        out = self.watch(out or self.out)
        return ["yaml", str(self.write("merge.yml", config)), str(out), "--no-copy-tokenizer", "--quiet", *flags]

    def stats(self, model, *flags: str, data=None, out: Optional[Path] = None) -> list[str]:
        out = self.watch(out or self.out)
        data = self.broken.text if data is None else data
        return ["stats", str(model), "--data", str(data), "--out", str(out), "--device", "cpu", *flags]

    def kinship(self, *args) -> list[str]:
        return ["kinship", *map(str, args)]

    # -- run dirs made before the command -----------------------------------
    def run_dir_with_ledger(self, digest: Optional[str], extra: dict | None = None) -> Path:
        """An out dir whose ledger names a run with `digest` (None: no digest)."""
        from mergekit_evolver.ledger import Ledger

        out = self.out
        out.mkdir()
        ledger = Ledger(out)
        if digest is not None:
            ledger.set_meta("config_digest", digest)
        ledger.close()
        for name, text in (extra or {}).items():
            (out / name).write_text(text)
        return out

    def corrupt_run_dir(self, config: dict) -> Path:
        """An out dir holding the run's files, but ledger.sqlite is random bytes."""
        out = self.out
        out.mkdir()
        (out / "run.yml").write_text(yaml.safe_dump(config))
        (out / "ledger.sqlite").write_bytes(os.urandom(4096))
        (out / "generations.jsonl").write_text("")
        return out


def digest(config: dict) -> str:
    from mergekit_evolver.config import EvolveConfig

    return EvolveConfig.model_validate(config).digest()


def with_(config: dict, section: str, **values) -> dict:
    config = copy.deepcopy(config)
    config[section] = {**config.get(section, {}), **values}
    return config


def without(config: dict, section: str, key: str) -> dict:
    config = copy.deepcopy(config)
    del config[section][key]
    return config


# ---------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[Ctx], list[str]]
    expect: str
    xfail: Optional[str] = None


CASES: list[Case] = []

# click's own usage errors (a missing option, a value outside a click type's
# range, a file where a dir is expected) print three lines.
USAGE = "click usage error: 3 lines (Usage: ..., Try '... --help', Error: ...), not one"


def case(id: str, expect: str, xfail: Optional[str] = None):
    def register(build: Callable[[Ctx], list[str]]):
        assert all(c.id != id for c in CASES), id
        CASES.append(Case(id, build, expect, xfail))
        return build

    return register


def _cases() -> None:
    """Every case, registered in order (a function, so the lambdas' names stay local)."""

    def evolve_case(id, expect, make, *flags, xfail=None):
        case("evolve/" + id, expect, xfail)(lambda c: c.evolve(make(c), *flags))

    # -- evolve: the config file as a whole --------------------------------
    evolve_case("malformed-yaml", "malformed YAML", lambda c: "population: [\n")
    evolve_case("not-a-mapping", "a run config must be a YAML mapping", lambda c: "- a\n- b\n")
    evolve_case("empty-file", "a run config must be a YAML mapping", lambda c: "")
    evolve_case("tabs-in-yaml", "malformed YAML", lambda c: "seed: 1\n\tpopulation: {}\n")
    evolve_case("unknown-top-level-key", "generations: Extra inputs are not permitted",
                lambda c: {**c.run(), "generations": 3})
    evolve_case("missing-population", "population: Field required",
                lambda c: {k: v for k, v in c.run().items() if k != "population"})
    evolve_case("missing-fitness", "fitness: Field required",
                lambda c: {k: v for k, v in c.run().items() if k != "fitness"})
    case("evolve/config-file-missing", "config not found")(
        lambda c: ["evolve", str(c.tmp / "absent.yml"), "--out", str(c.watch(c.out))])
    case("evolve/config-is-a-directory", "is a directory")(
        lambda c: (c.tmp.joinpath("run.yml").mkdir(), ["evolve", str(c.tmp / "run.yml"), "--out", str(c.watch(c.out))])[1])

    # -- evolve: unknown keys, in every section ---------------------------
    for section, key in [
        ("population", "model"), ("de", "Fx"), ("selection", "mod"), ("fitness", "limt"),
        ("report", "task"), ("output", "knd"), ("kinship", "trak"), ("greedy", "topk"),
        ("search", "budjet"),
    ]:
        evolve_case(f"unknown-key-in-{section}", f"{section}.{key}: Extra inputs are not permitted",
                    lambda c, s=section, k=key: with_(c.run(), s, **{k: 1}))
    evolve_case("unknown-key-in-a-task", "fitness.tasks.0.metrik: Extra inputs are not permitted",
                lambda c: with_(c.run(), "fitness", tasks=[{"name": "toy_dev", "metrik": "acc"}]))
    evolve_case("unknown-key-in-merger", "selection.merger.paramters: Extra inputs are not permitted",
                lambda c: with_(c.run(), "selection", merger={"merge_method": "linear", "paramters": {}}))
    evolve_case("unknown-key-in-recipe-member", "population.recipes.ties.slices: Extra inputs are not permitted",
                lambda c: with_(c.run(), "population", recipes={"ties": {"merge_method": "ties", "slices": []}}))

    # -- evolve: wrong types -----------------------------------------------
    evolve_case("generations-not-an-int", "de.generations: Input should be a valid integer",
                lambda c: with_(c.run(), "de", generations="many"))
    evolve_case("F-not-a-number", "de.F: Input should be a valid number",
                lambda c: with_(c.run(), "de", F="half"))
    evolve_case("models-not-a-list", "population.models: Input should be a valid list",
                lambda c: with_(c.run(), "population", models=str(c.world.models[0])))
    evolve_case("section-not-a-mapping", "de: Input should be a valid dictionary",
                lambda c: {**c.run(), "de": [1, 2]})
    evolve_case("batch-size-not-an-int", "fitness.batch_size: Input should be a valid integer",
                lambda c: with_(c.run(), "fitness", batch_size="big"))
    evolve_case("track-not-a-bool", "kinship.track: Input should be a valid boolean",
                lambda c: with_(c.run(), "kinship", track="often"))
    evolve_case("seed-not-an-int", "seed: Input should be a valid integer",
                lambda c: {**c.run(), "seed": 1.5})

    # -- evolve: values out of range ---------------------------------------
    for id, section, values, expect in [
        ("F-above-2", "de", {"F": 2.5}, "de.F: Input should be less than or equal to 2"),
        ("F-negative", "de", {"F": -0.1}, "de.F: Input should be greater than or equal to 0"),
        ("CR-above-1", "de", {"CR": 1.5}, "de.CR: Input should be less than or equal to 1"),
        ("CR-negative", "de", {"CR": -0.1}, "de.CR: Input should be greater than or equal to 0"),
        ("density-zero", "de", {"density": 0.0}, "de.density: Input should be greater than 0"),
        ("density-above-1", "de", {"density": 1.5}, "de.density: Input should be less than or equal to 1"),
        ("generations-zero", "de", {"generations": 0}, "de.generations: Input should be greater than or equal to 1"),
        ("limit-zero", "fitness", {"limit": 0}, "fitness.limit: Input should be greater than 0"),
        ("num-fewshot-negative", "fitness", {"num_fewshot": -1}, "fitness.num_fewshot: Input should be greater than or equal to 0"),
        ("no-fitness-tasks", "fitness", {"tasks": []}, "fitness.tasks: List should have at least 1 item"),
        ("task-weight-zero", "fitness", {"tasks": [{"name": "toy_dev", "weight": 0}]}, "fitness.tasks.0.weight: Input should be greater than 0"),
        ("stop-above-out-of-range", "kinship", {"stop_above": 2.0}, "kinship.stop_above: Input should be less than or equal to 1"),
        ("top-k-one", "greedy", {"top_k": 1}, "greedy.top_k: Input should be greater than or equal to 2"),
        ("search-budget-zero", "search", {"budget": 0}, "search.budget: Input should be greater than or equal to 1"),
        ("search-F-out-of-range", "search", {"F": 3}, "search.F: Input should be less than or equal to 2"),
        ("one-model", "population", {"models": ["{m0}"]}, "population.models: List should have at least 2 items"),
        ("subset-share-one", "fitness", {"subset": {"share": 1.0}}, "fitness.subset.share: Input should be less than 1"),
        ("confidence-half", "fitness", {"racing": {"mode": "statistical", "confidence": 0.5}},
         "fitness.racing.confidence: Input should be greater than 0.5"),
        ("reference-missing", "report", {"references": [{"name": "mt", "model": "/nonexistent/mt"}]},
         "report.references 'mt': not a HF model dir (no config.json): /nonexistent/mt"),
        ("reference-twice", "report", {"references": [{"name": "average", "model": "/x"}]},
         "report.references: names ['average'] are used twice"),
    ]:
        def make(c, section=section, values=values):
            values = {k: ([str(c.world.models[0])] if v == ["{m0}"] else v) for k, v in values.items()}
            return with_(c.run(), section, **values)

        evolve_case(id, expect, make)
    evolve_case("seed-negative", "seed: Input should be greater than or equal to 0",
                lambda c: {**c.run(), "seed": -1})

    # -- evolve: unknown names ---------------------------------------------
    for id, section, values, expect in [
        ("unknown-operator", "de", {"operator": "de_rand2"}, "de.operator: Input should be"),
        ("unknown-crossover", "de", {"crossover": "uniform"}, "de.crossover: Input should be 'binomial' or 'exponential'"),
        ("unknown-granularity", "de", {"granularity": "layer"}, "de.granularity: Input should be"),
        ("unknown-sparsify", "de", {"sparsify": "ties"}, "de.sparsify: Input should be"),
        ("unknown-space", "de", {"space": "deltas"}, "de.space: Input should be 'weights' or 'task_vectors'"),
        ("unknown-selection-mode", "selection", {"mode": "tournament"}, "selection.mode: Input should be 'individual' or 'merged'"),
        ("unknown-output-kind", "output", {"kind": "worst"}, "output.kind: Input should be 'best' or 'merged'"),
        ("unknown-device", "fitness", {"device": "tpu"}, "fitness.device: Input should be 'auto', 'cpu' or 'cuda'"),
        ("unknown-dtype", "fitness", {"dtype": "float8"}, "fitness.dtype: Input should be"),
        ("unknown-baseline", "report", {"baselines": ["average", "soup"]}, "report.baselines.1: Input should be"),
        ("unknown-kinship-metric", "kinship", {"metric": "ed"}, "kinship.metric: Input should be 'pcc' or 'cos'"),
        ("unknown-search-optimizer", "search", {"optimizer": "pso"}, "search.optimizer: Input should be 'de' or 'cmaes'"),
        ("unknown-de-strategy", "search", {"de_strategy": "rand/2/bin"}, "search.de_strategy: Input should be"),
        ("unknown-merger-method", "selection", {"mode": "merged", "merger": {"merge_method": "foo"}},
         "selection.merger.merge_method: unknown merge method: foo"),
        ("unknown-recipe-member-method", "population", {"recipes": {"x": {"merge_method": "foo"}}},
         "population.recipes.x.merge_method: unknown merge method: foo"),
        ("unknown-greedy-method", "greedy", {"merge_method": "foo"}, "greedy.merge_method: unknown merge method: foo"),
        ("greedy-method-needs-stats", "greedy", {"merge_method": "regmean"},
         "greedy.merge_method: regmean needs per-model statistics, which merged members do not have"),
    ]:
        evolve_case(id, expect, lambda c, s=section, v=values: with_(c.run(), s, **v))
    evolve_case("unknown-strategy", "strategy: unknown strategy 'annealing'; choose one of",
                lambda c: {**c.run(), "strategy": "annealing"})

    # -- evolve: rules across sections -------------------------------------
    evolve_case("too-few-models-for-operator", "de.operator de_rand1 needs a population of at least 4 (x and 3 distinct donors); got 3",
                lambda c: with_(with_(c.run(), "de", operator="de_rand1"), "population", models=c.models(*c.world.models[:3])))
    evolve_case("too-few-models-for-best1", "de.operator de_best1 needs a population of at least 4",
                lambda c: with_(with_(c.run(), "de", operator="de_best1"), "population", models=c.models(*c.world.models[:2])))
    evolve_case("kinship-without-base", "kinship needs population.base_model (kinship compares deltas from it)",
                lambda c: with_(without(c.run(), "population", "base_model"), "kinship", track=True))
    evolve_case("diverse-donors-without-base", "kinship needs population.base_model",
                lambda c: with_(without(c.run(), "population", "base_model"), "kinship", diverse_donors=True))
    evolve_case("task-vectors-without-base", "de.space task_vectors needs population.base_model (the reference)",
                lambda c: with_(without(c.run(), "population", "base_model"), "de", space="task_vectors"))
    evolve_case("kinship-greedy-without-base", "strategy kinship_greedy needs population.base_model (for kinship)",
                lambda c: {**without(c.run(), "population", "base_model"), "strategy": "kinship_greedy"})
    evolve_case("merger-lists-models", "selection.merger must not list models: the population fills them",
                lambda c: with_(c.run(), "selection", mode="merged",
                                merger={"merge_method": "linear", "models": [str(c.world.models[0])]}))
    evolve_case("merged-output-merger-lists-models", "selection.merger must not list models",
                lambda c: with_(with_(c.run(), "output", kind="merged"), "selection",
                                merger={"merge_method": "linear", "models": [str(c.world.models[0])]}))
    evolve_case("stats-dirs-count-mismatch", "population.stats needs one dir per model: 4 models, 2 dirs",
                lambda c: with_(c.run(), "population", stats=[str(c.tmp / "s0"), str(c.tmp / "s1")]))
    evolve_case("stats-merger-with-recipe-members", "a regmean/fisher merger needs statistics for every slot",
                lambda c: with_(with_(c.run(), "selection", merger={"merge_method": "regmean"}), "population",
                                recipes={"ties": {"merge_method": "ties", "parameters": {"weight": 1.0, "density": 0.5}}}))

    evolve_case("regmean-merger-without-stats", "no statistics at",
                lambda c: with_(c.run(), "selection", mode="merged", merger={"merge_method": "regmean"}))
    evolve_case("regmean-baseline-without-stats", "no statistics at",
                lambda c: with_(c.run(), "report", baselines=["regmean"]))
    evolve_case("stats-dirs-missing", "no statistics at",
                lambda c: with_(with_(c.run(), "selection", mode="merged", merger={"merge_method": "fisher"}),
                                "population", stats=[str(c.tmp / f"s{i}") for i in range(4)]))
    evolve_case("merger-cannot-merge-the-population", "selection.merger",
                lambda c: with_(c.run(), "selection", mode="merged", merger={"merge_method": "slerp"}))
    evolve_case("recipe-member-cannot-merge-the-population", "population.recipes.s",
                lambda c: with_(c.run(), "population", recipes={"s": {"merge_method": "slerp"}}))
    evolve_case("greedy-method-cannot-merge-two", "passthrough cannot merge two models",
                lambda c: {**with_(c.run(), "greedy", merge_method="passthrough"), "strategy": "kinship_greedy"})
    evolve_case("task-name-not-a-string", "fitness.tasks.0",
                lambda c: with_(c.run(), "fitness", tasks=[123]))
    evolve_case("include-path-is-a-file", "is not a directory",
                lambda c: with_(c.run(), "fitness", include_path=str(c.broken.text)))
    evolve_case("unsafe-yaml-tag", "malformed YAML",
                lambda c: "seed: !!python/object/apply:os.getcwd []\n")
    evolve_case("duplicate-key", "seed",
                lambda c: yaml.safe_dump(c.run()) + "seed: 5\n")

    # -- evolve: model paths -----------------------------------------------
    evolve_case("missing-model-path", "model path not found: /no/such/model",
                lambda c: with_(c.run(), "population", models=[str(c.world.models[0]), "/no/such/model"]))
    evolve_case("missing-base-model-path", "model path not found: /no/such/base",
                lambda c: with_(c.run(), "population", base_model="/no/such/base"))
    evolve_case("model-path-is-a-file", "model path not found: {a_file}",
                lambda c: with_(c.run(), "population", models=c.models(c.world.models[0], c.broken.a_file)))
    evolve_case("model-without-config-json", "not a HF model dir (no config.json): {no_config}",
                lambda c: with_(c.run(), "population", models=c.models(c.world.models[0], c.broken.no_config)))
    evolve_case("model-dir-empty", "{empty_dir}",
                lambda c: with_(c.run(), "population", models=c.models(c.world.models[0], c.broken.empty_dir)))
    evolve_case("models-differ-in-architecture", "models differ in architecture",
                lambda c: with_(c.run(), "population", models=c.models(c.world.models[0], c.broken.other_arch)))
    evolve_case("models-differ-in-tensor-names", "models differ in tensors",
                lambda c: with_(c.run(), "population", models=c.models(c.world.models[0], c.broken.deeper)))
    evolve_case("models-differ-in-tensor-shapes", "models differ in tensor shape:",
                lambda c: with_(c.run(), "population", models=c.models(c.world.models[0], c.broken.wide)))
    evolve_case("base-differs-in-tensor-shapes", "models differ in tensor shape:",
                lambda c: with_(c.run(), "population", base_model=str(c.broken.wide)))
    evolve_case("pickled-only-model", "{pickled}: no safetensors weights (found pytorch_model.bin)",
                lambda c: with_(c.run(), "population", models=c.models(c.world.models[0], c.broken.pickled)))
    evolve_case("truncated-safetensors", "not a valid safetensors file (truncated or corrupt)",
                lambda c: with_(c.run(), "population", models=c.models(c.world.models[0], c.broken.truncated)))
    evolve_case("broken-config-json", "{broken_json}/config.json: not valid JSON",
                lambda c: with_(c.run(), "population", models=c.models(c.world.models[0], c.broken.broken_json)))
    evolve_case("nan-weights-in-a-member", "{nan}: tensor model.layers.0.mlp.up_proj.weight holds NaN or Inf",
                lambda c: with_(c.run(de={"generations": 1}, report={"tasks": [], "baselines": []}),
                                "population", models=c.models(c.broken.nan, *c.world.models[1:])))

    evolve_case("nan-weights-in-base-model", "model.layers.0.mlp.up_proj.weight",
                lambda c: with_(c.run(de={"generations": 1}, report={"tasks": [], "baselines": []}),
                                "population", base_model=str(c.broken.nan)))

    # -- evolve: tasks -----------------------------------------------------
    evolve_case("unknown-fitness-task", "unknown lm-eval task(s) ['nope_task']",
                lambda c: with_(c.run(), "fitness", tasks=["toy_dev", "nope_task"]))
    evolve_case("unknown-report-task", "unknown lm-eval task(s) ['nope_test']",
                lambda c: with_(c.run(), "report", tasks=["nope_test"]))
    evolve_case("unknown-metric", "task toy_dev has no metric 'f1' (it has: acc)",
                lambda c: with_(c.run(), "fitness", tasks=[{"name": "toy_dev", "metric": "f1"}]))
    evolve_case("unknown-report-metric", "task toy_test has no metric 'bleu'",
                lambda c: with_(c.run(), "report", tasks=[{"name": "toy_test", "metric": "bleu"}]))
    evolve_case("missing-include-path", "include_path '/no/tasks' is not a directory",
                lambda c: with_(c.run(), "fitness", include_path="/no/tasks"))
    evolve_case("apply-chat-template-without-template", "has no chat template; set apply_chat_template: false",
                lambda c: with_(with_(c.run(), "fitness", apply_chat_template=True), "population",
                                models=c.models(c.broken.no_chat, *c.world.models[1:])))

    # -- evolve: recipe search settings ------------------------------------
    def recipe_case(id, expect, xfail=None, **search):
        evolve_case(id, expect, lambda c: c.recipe(**search))

    recipe_case("recipe-bad-layer-granularity", "layer_granularity 3 does not divide the model's 2 layers", layer_granularity=3)
    recipe_case("recipe-bounds-for-unsearched-parameter", "bounds for t, which dare_ties does not search", bounds={"t": [0, 1]})
    recipe_case("recipe-population-too-small", "rand/1/bin needs a population of at least 5", population_size=3)
    recipe_case("recipe-steady-with-cmaes", "mode steady is for optimizer de", optimizer="cmaes", mode="steady")
    recipe_case("recipe-bounds-reversed", "search: bounds for weight need low < high; got [1.0, 0.0]", bounds={"weight": [1, 0]})
    recipe_case("recipe-unsearchable-method", "search.merge_method: cannot search passthrough", merge_method="passthrough")
    recipe_case("recipe-nuslerp-over-four-models", "nuslerp interpolates exactly two models", merge_method="nuslerp")
    recipe_case("recipe-filter-matches-nothing", "nosuchmodule", filters=["nosuchmodule"])
    evolve_case("hybrid-too-few-models", "de.operator de_rand1 needs a population of at least 4",
                lambda c: with_(with_(c.recipe(hybrid=True), "de", operator="de_rand1"), "population",
                                models=c.models(*c.world.models[:2])))
    evolve_case("recipe-with-merged-output", "merged selection and output are for a weight-space population",
                lambda c: {**c.recipe(), "output": {"kind": "merged"}})
    evolve_case("recipe-with-recipe-members", "population.recipes adds weight-space members; strategy recipe",
                lambda c: with_(c.recipe(), "population",
                                recipes={"ties": {"merge_method": "ties", "parameters": {"weight": 1.0, "density": 0.5}}}))

    # -- evolve: mergekit-evolve configs -----------------------------------
    def mke_case(id, expect, make, *flags, xfail=None):
        case("evolve/mergekit-evolve-" + id, expect, xfail)(
            lambda c: c.evolve(make(c), "--task-search-path", str(c.world.include_path), *flags))

    mke_case("unknown-genome-key", "unknown key(s) in genome of", lambda c: c.mergekit_evolve(genome__layer_granulrity=1))
    mke_case("unknown-top-level-key", "unknown key(s) in", lambda c: c.mergekit_evolve(limt=5))
    mke_case("unknown-task-key", "unknown key(s) in tasks[0] of", lambda c: c.mergekit_evolve(tasks=[{"name": "toy_dev", "wieght": 2}]))
    mke_case("benchmark-task-without-flag", "common benchmark task", lambda c: c.mergekit_evolve(tasks=["arc_challenge"]))
    mke_case("invalid-method", "not a valid mergekit-evolve config", lambda c: c.mergekit_evolve(genome__merge_method="della"))
    mke_case("missing-model", "model path not found", lambda c: c.mergekit_evolve(genome__models=["/no/such/a", str(c.world.models[1])]))
    mke_case("chat-template-by-default", "has no chat template",
             lambda c: {**c.mergekit_evolve(genome__models=c.models(c.broken.no_chat, *c.world.models[1:])),
                        "apply_chat_template": True})
    mke_case("no-tasks", "not a valid mergekit-evolve config",
             lambda c: {k: v for k, v in c.mergekit_evolve().items() if k != "tasks"})
    mke_case("unknown-task", "unknown lm-eval task(s) ['nope_dev']", lambda c: c.mergekit_evolve(tasks=[{"name": "nope_dev"}]))
    case("evolve/mergekit-evolve-random-seed-for-native-config", "--random-seed: mergekit-evolve options")(
        lambda c: c.evolve(c.run(), "--random-seed", "3"))
    case("evolve/mergekit-evolve-options-for-native-config", "--max-fevals: mergekit-evolve options, for mergekit-evolve configs only")(
        lambda c: c.evolve(c.run(), "--max-fevals", "5"))
    case("evolve/mergekit-evolve-sigma0-for-native-config", "--sigma0: mergekit-evolve options")(
        lambda c: c.evolve(c.run(), "--sigma0", "0.3"))

    # -- evolve: the out dir -----------------------------------------------
    def notes(c):
        c.out.mkdir()
        (c.out / "notes.txt").write_text("mine")
        return c.evolve(c.run())

    case("evolve/out-dir-not-empty", "is not empty and holds no run; choose another --out")(notes)
    case("evolve/out-dir-is-a-file", "is a file")(
        lambda c: (c.out.write_text("mine"), c.evolve(c.run()))[1])
    case("evolve/out-dir-holds-another-run", "holds another run (its config differs); choose another --out")(
        lambda c: (c.run_dir_with_ledger("someone-else", {"run.yml": "seed: 9\n"}), c.evolve(c.run()))[1])
    case("evolve/out-dir-holds-this-run-without-resume", "already holds this run; pass --resume to continue it")(
        lambda c: (c.run_dir_with_ledger(digest(c.run())), c.evolve(c.run()))[1])
    case("evolve/resume-with-nothing-to-resume", "nothing to resume")(lambda c: c.evolve(c.run(), "--resume"))
    case("evolve/resume-empty-out-dir", "nothing to resume")(
        lambda c: (c.out.mkdir(), c.evolve(c.run(), "--resume"))[1])
    case("evolve/resume-with-a-changed-config", "holds another run (its config differs)")(
        lambda c: (c.run_dir_with_ledger(digest(c.run())), c.evolve(with_(c.run(), "de", F=0.7), "--resume"))[1])
    case("evolve/resume-on-a-corrupt-ledger", "ledger.sqlite")(
        lambda c: (c.corrupt_run_dir(c.run()), c.evolve(c.run(), "--resume"))[1])
    case("evolve/new-run-on-a-corrupt-ledger", "ledger.sqlite")(
        lambda c: (c.corrupt_run_dir(c.run()), c.evolve(c.run()))[1])

    # -- evolve: usage errors (click) --------------------------------------
    case("evolve/usage-missing-out", "Missing option '--out'")(
        lambda c: ["evolve", str(c.write("run.yml", c.run()))])
    case("evolve/usage-max-fevals-zero", "--max-fevals")(
        lambda c: c.evolve(c.mergekit_evolve(), "--max-fevals", "0"))

    # -- yaml ----------------------------------------------------------------
    def yaml_case(id, expect, make, xfail=None):
        case("yaml/" + id, expect, xfail)(lambda c: c.yaml(make(c)))

    yaml_case("malformed-yaml", "malformed YAML", lambda c: "merge_method: de_rand1\nmodels: [\n")
    yaml_case("not-a-mapping", "a merge config must be a YAML mapping", lambda c: "- just\n- a list\n")
    yaml_case("unknown-key", "paramters", lambda c: {**c.merge(), "paramters": {"seed": 1}})
    yaml_case("unknown-model-key", "weigth",
              lambda c: {**c.merge(), "models": [{"model": str(m), "weigth": 1} for m in c.world.models[1:4]]})
    yaml_case("missing-base-model", "de_rand1 needs base_model: it is the target individual x",
              lambda c: {k: v for k, v in c.merge().items() if k != "base_model"})
    yaml_case("too-few-donors", "de_rand1 needs exactly 3 donor model(s) (r1, r2, r3) besides base_model; got 2",
              lambda c: c.merge(donors=c.world.models[1:3]))
    yaml_case("too-many-donors", "de_current_to_rand1 needs exactly 1 donor model(s) (r) besides base_model; got 3",
              lambda c: c.merge("de_current_to_rand1"))
    yaml_case("F-out-of-range", "F must be in [0.0, 2.0]; got 3.0", lambda c: c.merge(F=3.0))
    yaml_case("CR-out-of-range", "CR must be in [0.0, 1.0]; got 1.5", lambda c: c.merge(CR=1.5))
    yaml_case("density-zero", "density must be in (0.0, 1.0]; got 0.0", lambda c: c.merge(density=0.0, sparsify="dare"))
    yaml_case("unknown-crossover", "crossover must be one of binomial, exponential; got 'uniform'", lambda c: c.merge(crossover="uniform"))
    yaml_case("missing-seed", "Missing required parameter seed",
              lambda c: {**c.merge(), "parameters": {"F": 0.5, "CR": 0.5}})
    yaml_case("unknown-method", "no_such_method", lambda c: c.merge("no_such_method"))
    yaml_case("missing-model-path", "model path not found: /no/such/model",
              lambda c: c.merge(donors=[c.world.models[1], c.world.models[2], "/no/such/model"]))
    yaml_case("missing-base-model-path", "model path not found: /no/such/base",
              lambda c: c.merge(base="/no/such/base"))
    yaml_case("pickled-only-donor", "{pickled}: no safetensors weights (found pytorch_model.bin)",
              lambda c: c.merge(donors=[c.world.models[1], c.world.models[2], c.broken.pickled]))
    yaml_case("truncated-safetensors", "{truncated}/model.safetensors: not a valid safetensors file (truncated or corrupt)",
              lambda c: c.merge(donors=[c.world.models[1], c.world.models[2], c.broken.truncated]))
    yaml_case("broken-config-json", "{broken_json}/config.json: not valid JSON",
              lambda c: c.merge(donors=[c.world.models[1], c.world.models[2], c.broken.broken_json]))
    yaml_case("models-differ-in-tensor-shapes", "models differ in tensor shape: lm_head.weight",
              lambda c: c.linear(c.world.models[0], c.broken.wide))
    yaml_case("task-vectors-without-reference", "needs the reference base among its models",
              lambda c: c.merge(space="task_vectors"))
    yaml_case("unknown-de-parameter", "crossver", lambda c: c.merge(crossver="exponential"))
    yaml_case("negative-seed", "seed must be a non-negative integer; got -4", lambda c: c.merge(seed=-4))
    yaml_case("unknown-granularity", "granularity must be one of element, row, tensor; got 'layer'",
              lambda c: c.merge(granularity="layer"))
    yaml_case("unknown-dtype", "unknown dtype 'float8' (one of bfloat16, float16, float32, float64)", lambda c: {**c.merge(), "dtype": "float8"})
    yaml_case("no-models", "Exactly one of 'models', 'slices', or 'modules' must be present", lambda c: {"merge_method": "linear", "models": [], "dtype": "float32"})
    case("yaml/out-path-is-a-file", "is a file")(
        lambda c: ["yaml", str(c.write("merge.yml", c.merge())), str(c.broken.a_file), "--quiet"])
    case("yaml/config-file-missing", "absent.yml")(
        lambda c: ["yaml", str(c.tmp / "absent.yml"), str(c.watch(c.out)), "--quiet"])

    def yaml_into_existing(c):
        c.out.mkdir()
        (c.out / "keep.txt").write_text("mine")
        return c.yaml(c.merge(F=3.0))

    case("yaml/bad-config-leaves-existing-out-dir", "F must be in [0.0, 2.0]; got 3.0")(yaml_into_existing)

    # -- kinship -------------------------------------------------------------
    def kin_case(id, expect, make, xfail=None):
        case("kinship/" + id, expect, xfail)(lambda c: c.kinship(*make(c)))

    w = lambda c: c.world  # noqa: E731
    kin_case("one-model", "kinship needs at least 2 models; got 1", lambda c: [w(c).models[0], "--base", w(c).base])
    kin_case("no-models", "kinship needs at least 2 models; got 0", lambda c: ["--base", w(c).base])
    kin_case("missing-model", "nope: no such model directory", lambda c: [w(c).models[0], c.tmp / "nope", "--base", w(c).base])
    kin_case("missing-base", "nobase: no such model directory", lambda c: [*w(c).models[:2], "--base", c.tmp / "nobase"])
    kin_case("no-base-option", "--base is required", lambda c: w(c).models[:2])
    kin_case("bad-metric-name", "unknown metric 'kl'; choose from pcc, cos, ed",
             lambda c: [*w(c).models[:2], "--base", w(c).base, "--metrics", "pcc,kl"])
    kin_case("no-metric", "no metric given", lambda c: [*w(c).models[:2], "--base", w(c).base, "--metrics", ","])
    kin_case("mismatched-shapes", "kinship needs one architecture",
             lambda c: [w(c).models[0], c.broken.wide, "--base", w(c).base])
    kin_case("empty-model-dir", "no safetensors weights found",
             lambda c: [w(c).models[0], c.broken.empty_dir, "--base", w(c).base])
    kin_case("pickled-only-model", "{pickled}: no safetensors weights (found pytorch_model.bin)",
             lambda c: [w(c).models[0], c.broken.pickled, "--base", w(c).base])
    kin_case("truncated-base", "not a valid safetensors file (truncated or corrupt)",
             lambda c: [*w(c).models[:2], "--base", c.broken.truncated])
    kin_case("model-is-a-file", "is a file",
             lambda c: [w(c).models[0], c.broken.a_file, "--base", w(c).base])

    # -- stats ---------------------------------------------------------------
    def stats_case(id, expect, make, xfail=None):
        case("stats/" + id, expect, xfail)(make)

    stats_case("missing-model", "is not a model directory", lambda c: c.stats(c.tmp / "missing"))
    stats_case("model-without-config", "is not a model directory", lambda c: c.stats(c.broken.no_config))
    stats_case("unknown-kind", "--kind must be gram, fisher or gram,fisher; got 'grams'",
               lambda c: c.stats(c.world.models[0], "--kind", "grams"))
    stats_case("missing-data-file", "data file not found", lambda c: c.stats(c.world.models[0], data=c.tmp / "missing.jsonl"))
    stats_case("empty-data", "no examples", lambda c: c.stats(c.world.models[0], data=c.broken.blank))
    stats_case("no-text-field", 'needs a string "text" field', lambda c: c.stats(c.world.models[0], data=c.broken.no_text_field))
    stats_case("unknown-task", "not a .jsonl/.txt file nor an lm-eval task",
               lambda c: c.stats(c.world.models[0], "--include-path", str(c.world.include_path), data="no_such_task"))
    stats_case("zero-examples", "--max-examples must be at least 1; got 0",
               lambda c: c.stats(c.world.models[0], "--max-examples", "0"))
    stats_case("bad-split", "--split must be one of",
               lambda c: c.stats(c.world.models[0], "--include-path", str(c.world.include_path), "--split", "dev", data="toy_dev"))
    stats_case("bad-dtype", "--dtype must be one of", lambda c: c.stats(c.world.models[0], "--dtype", "int8"))
    stats_case("batch-size-zero", "--batch-size must be at least 1; got 0",
               lambda c: c.stats(c.world.models[0], "--batch-size", "0"))
    stats_case("max-length-one", "--max-length must be at least 2; got 1",
               lambda c: c.stats(c.world.models[0], "--max-length", "1"))
    stats_case("include-path-missing", "--include-path is not a directory",
               lambda c: c.stats(c.world.models[0], "--include-path", str(c.tmp / "notasks"), data="toy_dev"))
    stats_case("truncated-model", "not a valid safetensors file (truncated or corrupt)",
               lambda c: c.stats(c.broken.truncated))
    stats_case("pickled-only-model", "{pickled}: no safetensors weights (found pytorch_model.bin)",
               lambda c: c.stats(c.broken.pickled))

    def foreign_out(c):
        c.out.mkdir()
        (c.out / "precious.txt").write_text("keep me")
        return c.stats(c.world.models[0])

    stats_case("out-dir-not-a-stats-dir", "exists and is not a stats dir", foreign_out)

    # -- report --------------------------------------------------------------
    case("report/dir-with-no-run", "holds no run")(
        lambda c: (c.out.mkdir(), ["report", str(c.out)])[1])
    case("report/missing-dir", "holds no run")(lambda c: ["report", str(c.tmp / "absent")])
    case("report/corrupt-ledger", "ledger.sqlite")(
        lambda c: ["report", str(c.corrupt_run_dir(c.run()))])
    case("report/ledger-without-run-yml", "run.yml")(
        lambda c: ["report", str(c.run_dir_with_ledger(digest(c.run())))])
    case("report/invalid-run-yml", "seed: Input should be greater than or equal to 0")(
        lambda c: ["report", str(c.run_dir_with_ledger(digest(c.run()), {"run.yml": yaml.safe_dump({**c.run(), "seed": -1})}))])
    case("report/out-is-a-file", "is a file")(lambda c: ["report", str(c.broken.a_file)])
    case("report/malformed-run-yml", "run.yml")(
        lambda c: ["report", str(c.run_dir_with_ledger(digest(c.run()), {"run.yml": "population: [\n"}))])

    # -- testbed and demo ------------------------------------------------------
    case("testbed/out-is-a-file", "is a file")(lambda c: ["testbed", str(c.broken.a_file)])
    case("demo/testbed-is-a-file", "is a file")(
        lambda c: ["demo", "--testbed", str(c.broken.a_file), "--out", str(c.watch(c.out))])


_cases()


def expected(case: Case, broken: Broken) -> str:
    """The case's substring with {name} replaced by that broken model's path."""
    return case.expect.format(**{k: str(v) for k, v in vars(broken).items()})
