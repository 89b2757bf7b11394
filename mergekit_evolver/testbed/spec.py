"""What a testbed is built from: one frozen spec and its presets.

Two kinds of merging problem:

- ``disjoint`` (FULL): a base near chance on every family and specialists that
  learn their family from scratch. Every weight average lands near chance, so
  no merge can fuse skills: it tests selection, not fusion.
- ``merge_friendly`` (MERGE_FRIENDLY): a base pretrained on a broad mix, with
  partial skill on every family, and specialists that are light fine-tunes of
  it, as real fine-tunes of one LLM are. Averaging keeps part of each skill.

Both also train a multi-task fine-tune with the specialists' whole training
budget: an upper reference for reports, never a population member.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass

from mergekit_evolver.testbed.families import ALPHABET, IN_DOMAIN, OUT_OF_DOMAIN, get_family


@dataclass(frozen=True)
class TestbedSpec:
    """Everything that determines a testbed's bits (and its manifest's identity)."""

    __test__ = False  # not a pytest test class, despite the name

    name: str
    kind: str = "disjoint"  # which properties it must have (properties.py)
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
    # The base's mix: this share of generic items (families.GENERIC), the rest
    # from the in-domain families in proportion to base_weights (uniform if empty).
    # 0 keeps the disjoint kind's uniform draw over the families.
    generic_share: float = 0.0
    base_weights: tuple[float, ...] = ()
    # The multi-task reference: from the base, on all families at once, for
    # specialist_steps x the number of families (the specialists' total budget).
    multitask: bool = True
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
    # merge_friendly only: the uniform average keeps less than this share of the
    # gain of at least min_room_families specialists (room for a search).
    max_kept_gain: float = 0.7
    min_room_families: int = 2

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown testbed kind {self.kind!r}; known: {list(KINDS)}")
        if self.base_weights and len(self.base_weights) != len(self.families):
            raise ValueError(f"{len(self.base_weights)} base_weights for {len(self.families)} families")
        if not 0 <= self.generic_share < 1:
            raise ValueError(f"generic_share must be in [0, 1), got {self.generic_share}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
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
        d["base_weights"] = list(self.base_weights)
        return d

    @classmethod
    def from_json(cls, data: dict) -> "TestbedSpec":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ValueError(f"unknown testbed spec fields {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    def sized(self, width: int | None = None, layers: int | None = None) -> "TestbedSpec":
        """The same recipe on a larger (or smaller) model: MLP 4x the width,
        heads of 16 dimensions (at least one)."""
        if width is None and layers is None:
            return self
        changes: dict = {}
        if width is not None:
            if width < 16 or width % 16:
                raise ValueError(f"--width must be a multiple of 16, at least 16; got {width}")
            changes.update(hidden_size=width, intermediate_size=4 * width, num_heads=width // 16)
        if layers is not None:
            if layers < 1:
                raise ValueError(f"--layers must be at least 1; got {layers}")
            changes["num_layers"] = layers
        suffix = f"-w{changes.get('hidden_size', self.hidden_size)}-l{changes.get('num_layers', self.num_layers)}"
        return dataclasses.replace(self, name=self.name + suffix, **changes)


KINDS = ("disjoint", "merge_friendly")


FULL = TestbedSpec(name="full")

# Tuned once on seed 0 until its properties held (properties.py), then frozen:
# a longer base run on a mix that is 95% generic items, weighted toward the two
# families the model learns slowest (argmax, count), and specialists at a third
# of the disjoint kind's learning rate for a fifth of its steps.
MERGE_FRIENDLY = TestbedSpec(
    name="merge_friendly",
    kind="merge_friendly",
    base_steps=600,
    base_lr=3e-3,
    base_warmup=30,
    generic_share=0.95,
    base_weights=(1.0, 1.0, 3.0, 3.0),
    specialist_steps=60,
    specialist_lr=1e-3,
    specialist_warmup=5,
    min_specialist_gain=0.15,
)

PRESETS = {"disjoint": FULL, "merge_friendly": MERGE_FRIENDLY}

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
