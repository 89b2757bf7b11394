"""What a testbed is built from: one frozen spec, two presets (FULL and TINY)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from mergekit_evolver.testbed.families import ALPHABET, IN_DOMAIN, OUT_OF_DOMAIN, get_family


@dataclass(frozen=True)
class TestbedSpec:
    """Everything that determines a testbed's bits (and its manifest's identity)."""

    __test__ = False  # not a pytest test class, despite the name

    name: str
    seed: int = 0
    families: tuple[str, ...] = IN_DOMAIN
    ood_families: tuple[str, ...] = OUT_OF_DOMAIN
    str_len: int = 5
    # The model (LlamaForCausalLM over the character tokenizer).
    hidden_size: int = 64
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    # Training: a short base run on the mix of all in-domain families, then a
    # longer fine-tune per family from that base. The base stays near chance on
    # every family; each specialist reaches about 1.0 on its own.
    batch_size: int = 32
    base_steps: int = 60
    base_lr: float = 3e-3
    base_warmup: int = 30
    specialist_steps: int = 300
    specialist_lr: float = 1e-3
    specialist_warmup: int = 10
    # Data.
    n_dev: int = 100
    n_test: int = 200
    eval_batch_size: int = 64
    # The properties that make it a fair merging problem, asserted after a build
    # (build.check_properties): (a) every specialist beats the base on its own
    # test task by >= min_specialist_gain; (b) the uniform average trails the
    # specialists on their own test tasks by >= min_mean_average_gap on average
    # (twice the 0.1 first suggested, so "clearly below" means it). FULL clears
    # them by wide margins: gains 0.50-0.80 and mean gaps 0.57-0.63 at seeds 0-3.
    check_properties: bool = True
    min_specialist_gain: float = 0.3
    min_mean_average_gap: float = 0.2

    def __post_init__(self) -> None:
        if not self.families:
            raise ValueError("a testbed needs at least one in-domain family")
        listed = self.families + self.ood_families
        twice = sorted({n for n in listed if listed.count(n) > 1})
        if twice:
            raise ValueError(f"families listed more than once: {twice}")
        for name in listed:
            fam = get_family(name)  # raises on an unknown name
            if fam.ood != (name in self.ood_families):
                kind = "out-of-domain" if fam.ood else "in-domain"
                where = "ood_families" if fam.ood else "families"
                raise ValueError(f"family {name!r} is {kind}: list it in {where}")
        for key in ("n_dev", "n_test", "base_steps", "specialist_steps", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if not 5 <= self.str_len <= len(ALPHABET):
            # argmax's distractors need a fifth letter; inputs are distinct letters.
            raise ValueError(f"str_len must be between 5 and {len(ALPHABET)}, got {self.str_len}")

    def to_json(self) -> dict:
        d = asdict(self)
        d["families"] = list(self.families)
        d["ood_families"] = list(self.ood_families)
        return d


FULL = TestbedSpec(name="full")

TINY = TestbedSpec(
    name="tiny",
    hidden_size=32,
    intermediate_size=64,
    num_layers=1,
    num_heads=2,
    batch_size=16,
    base_steps=8,
    base_warmup=2,
    specialist_steps=8,
    specialist_warmup=2,
    n_dev=12,
    n_test=16,
    check_properties=False,
)
