"""A mergekit recipe without its inputs, as a run config names one
(selection.merger, population.recipes): the run fills in the models."""

from __future__ import annotations

from typing import Any, Optional

from mergekit import merge_methods
from mergekit.merge_methods import MergeMethod
from pydantic import SerializerFunctionWrapHandler, field_validator, model_serializer

from mergekit_evolver.config.base import Strict


def known_method(name: str) -> MergeMethod:
    """mergekit's method of that name. Asked at load time so a typo costs no
    evaluation; the plugin's own methods are registered by importing the package."""
    try:
        return merge_methods.get(name)
    except RuntimeError:
        raise ValueError(f"unknown merge method: {name}") from None


class RecipeTemplate(Strict):
    """The keys of a mergekit MergeConfiguration that a template may set.
    slices and modules are left out: the run always merges a list of models."""

    merge_method: str
    parameters: Optional[dict[str, Any]] = None
    base_model: Optional[str] = None
    tokenizer_source: Optional[str] = None
    tokenizer: Optional[dict[str, Any]] = None
    chat_template: Optional[str] = None
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    # A key rather than an unknown-key error, so that EvolveConfig can say why
    # a merger may not list them (the population fills them).
    models: Optional[list[Any]] = None

    @field_validator("merge_method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        known_method(value)
        return value

    # Only the keys the user gave, as the plain dict this model replaced held
    # them: a run's digest and its recorded recipes must not change when a
    # default is added here.
    @model_serializer(mode="wrap")
    def _as_given(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if k in self.model_fields_set}

    def template(self) -> dict[str, Any]:
        """The plain mergekit config data (no models) for the recipe builders."""
        return self.model_dump()
