"""Registries: components are looked up by name, never picked by if/elif.

A component is one function plus its capability flags. Registering a new estimator,
compression or merge rule is one decorator; tests, presets, sweeps and benchmarks find
it by name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Component:
    """A registered function and what it can do.

    Attributes:
      name: the name the config uses.
      fn: the function.
      supports_causal: can be used in a causal (autoregressive) call.
      supports_padding: honours a key padding mask.
      exact_when_full: equals dense attention when its budget covers everything.
      fixed_length: needs a sequence length known when parameters are created.
      supports_exclusion: (compressions) can leave out the key blocks selection computed.
      extras: anything else a component wants to carry (e.g. a row-weights function).
    """

    name: str
    fn: Callable[..., Any]
    supports_causal: bool = True
    supports_padding: bool = True
    exact_when_full: bool = False
    fixed_length: bool = False
    supports_exclusion: bool = False
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)


class Registry:
    """A named table of components; unknown names get an error listing the known ones."""

    def __init__(self, kind: str, config_key: str):
        self.kind = kind
        self.config_key = config_key
        self._items: dict[str, Component] = {}

    def register(self, name: str, **flags: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: `@REGISTRY.register("name", supports_causal=False)`."""

        def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            extras = flags.pop("extras", {})
            self._items[name] = Component(name=name, fn=fn, extras=dict(extras), **flags)
            return fn

        return wrap

    def add_extra(self, name: str, key: str, value: Any) -> None:
        """Attach a companion function (e.g. `row_logw`) to a registered component."""
        self._items[name].extras[key] = value

    def unregister(self, name: str) -> None:
        """Remove a component (for notebooks and tests that register temporary variants)."""
        self._items.pop(name, None)

    def get(self, name: str) -> Component:
        if name not in self._items:
            raise ValueError(f"{self.config_key}: {name!r} is not one of {', '.join(self.names())}")
        return self._items[name]

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items


ESTIMATORS = Registry("importance estimator", "model.attention.selection.estimator")
COMPRESSIONS = Registry("compression", "model.attention.compression.kind")
CORRECTIONS = Registry("merge rule", "model.attention.correction.merge")
