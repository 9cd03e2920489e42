"""Sweeps as data: lists of override dicts, the combinators that build them, and their
expansion into named runs.

A *sweep* is a list of *entries*; an entry is a flat dict of config overrides
(`{"model.attention.selection.top_k": 8}`) plus, optionally, three meta keys:

- `__arg__`: a dict merged into the config file's argument string
  (`{"attention": "performer"}` turns `attention=rsa,scale=small` into
  `attention=performer,scale=small`): the way to pick a preset, since presets are chosen by
  the config argument, not by individual keys;
- `__name__`: the readable name of the run (a directory name; the seed is appended);
- `__label__`: the row the run lands in when tables are made (default: the name).

Config files build their sweeps with `axis`, `product`, `zip_` and `chain`, use the
standard `ablation_sweep()` and `presets_sweep()`, and dispatch by name with `pick`:

    def get_sweep(name, arg):
        return expand.pick(name, {
            "ablation": expand.ablation_sweep,
            "presets": expand.presets_sweep,
            "top_k": lambda: expand.axis("model.attention.selection.top_k", [2, 4, 8]),
        })

Seeds are not part of a sweep: `expand_runs` multiplies the entries by the seeds and puts
`seed=<s>` into the config argument.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

Entry = dict[str, Any]
"""One element of a sweep: flat dotted config keys -> values, plus optional meta keys."""

ARG = "__arg__"
NAME = "__name__"
LABEL = "__label__"
META_KEYS = (ARG, NAME, LABEL)

# The presets of DESIGN.md, used when the attention registry cannot be imported.
DEFAULT_PRESETS: tuple[str, ...] = (
    "dense", "local", "bigbird", "longformer", "linformer",
    "performer", "nystrom", "scatterbrain", "nsa", "rsa",
)
ABLATED_ESTIMATORS: tuple[str, ...] = ("pooled", "bound", "sampled")

_ATT = "model.attention"
SELECTION_ENABLED = f"{_ATT}.selection.enabled"
SELECTION_ESTIMATOR = f"{_ATT}.selection.estimator"
COMPRESSION_ENABLED = f"{_ATT}.compression.enabled"
COMPRESSION_KIND = f"{_ATT}.compression.kind"
CORRECTION_ENABLED = f"{_ATT}.correction.enabled"
CORRECTION_AUX_WEIGHT = f"{_ATT}.correction.aux_weight"


# --------------------------------------------------------------------------- combinators


def axis(key: str, values: Iterable[Any], *, names: Sequence[str] | None = None,
         labels: Sequence[str] | None = None) -> list[Entry]:
    """One entry per value of a single config key.

    `axis("model.attention.selection.top_k", [4, 8])` gives
    `[{"model.attention.selection.top_k": 4}, {"model.attention.selection.top_k": 8}]`.
    `names` / `labels`, when given, set each entry's run name / table label.
    """
    values = list(values)
    for extra, what in ((names, "names"), (labels, "labels")):
        if extra is not None and len(extra) != len(values):
            raise ValueError(f"axis({key!r}): {len(values)} values but {len(extra)} {what}")
    entries: list[Entry] = []
    for i, value in enumerate(values):
        entry: Entry = {key: value}
        if names is not None:
            entry[NAME] = names[i]
        if labels is not None:
            entry[LABEL] = labels[i]
        entries.append(entry)
    return entries


def merge(*entries: Entry) -> Entry:
    """Merge entries into one. Meta keys combine (names joined by `-`, labels by `, `,
    `__arg__` dicts merged); the same config key set twice to different values is an error."""
    out: Entry = {}
    names: list[str] = []
    labels: list[str] = []
    arg: dict[str, Any] = {}
    for entry in entries:
        for key, value in entry.items():
            if key == NAME:
                names.append(str(value))
            elif key == LABEL:
                labels.append(str(value))
            elif key == ARG:
                for k, v in dict(value).items():
                    if k in arg and arg[k] != v:
                        raise ValueError(f"conflicting config argument {k!r}: {arg[k]!r} vs {v!r}")
                    arg[k] = v
            elif key in out and out[key] != value:
                raise ValueError(f"conflicting overrides for {key!r}: {out[key]!r} vs {value!r}")
            else:
                out[key] = value
    if arg:
        out[ARG] = arg
    if names:
        out[NAME] = "-".join(names)
    if labels:
        out[LABEL] = ", ".join(labels)
    return out


def product(*axes: Sequence[Entry]) -> list[Entry]:
    """The Cartesian product of sweeps, each combination merged (see `merge`).
    The last axis varies fastest."""
    return [merge(*combo) for combo in itertools.product(*axes)]


def zip_(*axes: Sequence[Entry]) -> list[Entry]:
    """Element-wise combination of sweeps of equal length, each tuple merged."""
    lengths = {len(a) for a in axes}
    if len(lengths) > 1:
        raise ValueError(f"zip_: sweeps of different lengths {[len(a) for a in axes]}")
    return [merge(*combo) for combo in zip(*axes)]


def chain(*sweeps: Sequence[Entry]) -> list[Entry]:
    """The sweeps one after another (copies of their entries)."""
    return [dict(entry) for sweep in sweeps for entry in sweep]


def pick(name: str, sweeps: Mapping[str, Callable[[], list[Entry]] | list[Entry]]) -> list[Entry]:
    """The sweep called `name` from a config file's table of sweeps (values may be lists or
    zero-argument functions, so that unused sweeps cost nothing). An unknown name raises a
    `ValueError` listing the known ones."""
    if name not in sweeps:
        raise ValueError(f"unknown sweep {name!r}; known sweeps: {', '.join(sorted(sweeps))}")
    sweep = sweeps[name]
    return list(sweep() if callable(sweep) else sweep)


# --------------------------------------------------------------------------- standard sweeps


def preset_names() -> list[str]:
    """The attention presets: from the attention registry when it can be imported (so a new
    preset joins the `presets` sweep by itself), else the table of DESIGN.md."""
    try:
        from sparseformer.attention import presets  # noqa: PLC0415 (imports JAX: only when asked)
    except ImportError:
        return list(DEFAULT_PRESETS)
    return list(presets.names())


def presets_sweep(names: Sequence[str] | None = None) -> list[Entry]:
    """One entry per preset, each picking it through the config argument
    (`{"__arg__": {"attention": name}, "__name__": name, "__label__": name}`)."""
    names = preset_names() if names is None else list(names)
    return [{ARG: {"attention": n}, NAME: n, LABEL: n} for n in names]


def preset_estimator(preset: str) -> str | None:
    """The top-k estimator `preset` uses, from the attention registry (None when it cannot be
    imported or the preset has no such key)."""
    try:
        from sparseformer.attention import presets  # noqa: PLC0415 (imports JAX: only when asked)
        return str(presets.get(preset).selection.estimator)
    except (ImportError, AttributeError, KeyError, ValueError):
        return None


def ablation_sweep(base_preset: str = "rsa", *, estimators: Sequence[str] = ABLATED_ESTIMATORS,
                   default_estimator: str | None = "auto") -> list[Entry]:
    """The component ablation of `base_preset` (the issue's list), on top of that preset:

    | name                | label                              | what changes                      |
    | ------------------- | ---------------------------------- | --------------------------------- |
    | dense               | dense                              | all three components off          |
    | selection           | selection only                     | compression, correction off       |
    | compression         | compression only                   | selection, correction off         |
    | sel-comp-naive      | selection + compression (naive)    | correction off: the naive sum     |
    | sel-comp-corr-noreg | ... + correction, no regulariser   | `aux_weight = 0`                  |
    | rsa                 | rsa (<its estimator>)              | nothing: the full preset          |
    | rsa-<estimator>     | rsa (<estimator>)                  | the top-k importance estimator    |

    Every entry carries `__arg__ = {"attention": base_preset}`, so the ablation is of that
    preset whatever the sweep's own argument says. `default_estimator` is the estimator the
    preset already uses (`"auto"`: looked up in the preset registry; `None`: unknown): its
    row would repeat the full preset, so it is left out and the full row is labelled with it
    (`rsa (bound)`), so the estimator rows still compare all of `estimators`.
    """
    if default_estimator == "auto":
        default_estimator = preset_estimator(base_preset)
    base = {ARG: {"attention": base_preset}}
    off = {SELECTION_ENABLED: False, COMPRESSION_ENABLED: False, CORRECTION_ENABLED: False}
    full_label = f"{base_preset} ({default_estimator})" if default_estimator in estimators else base_preset
    rows: list[tuple[str, str, Entry]] = [
        ("dense", "dense", off),
        ("selection", "selection only", {**off, SELECTION_ENABLED: True}),
        ("compression", "compression only", {**off, COMPRESSION_ENABLED: True}),
        ("sel-comp-naive", "selection + compression (naive)", {CORRECTION_ENABLED: False}),
        ("sel-comp-corr-noreg", "selection + compression + correction, no regulariser",
         {CORRECTION_ENABLED: True, CORRECTION_AUX_WEIGHT: 0.0}),
        (base_preset, full_label, {}),
    ]
    rows += [(f"{base_preset}-{e}", f"{base_preset} ({e})", {SELECTION_ESTIMATOR: e})
             for e in estimators if e != default_estimator]
    return [{**base, **overrides, NAME: name, LABEL: label} for name, label, overrides in rows]


# --------------------------------------------------------------------------- runs


def parse_arg(arg: str) -> dict[str, str]:
    """`"attention=rsa,scale=small"` -> `{"attention": "rsa", "scale": "small"}` (order kept)."""
    out: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in arg.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"config argument {arg!r}: {item!r} is not key=value")
        out[key.strip()] = value.strip()
    return out


def format_arg(arg: Mapping[str, Any]) -> str:
    """Inverse of `parse_arg`."""
    return ",".join(f"{k}={v}" for k, v in arg.items())


def split_spec(spec: str) -> tuple[str, str]:
    """`"configs/listops.py:attention=rsa"` -> `("configs/listops.py", "attention=rsa")`."""
    path, _, arg = spec.partition(":")
    return path, arg


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of a sweep: what `run.json` records."""

    name: str                 # directory name, e.g. "rsa-bound__seed1"
    label: str                # table row, e.g. "rsa (bound)"
    config_path: str          # "configs/listops.py"
    arg: str                  # the full config argument, seed included
    overrides: dict[str, Any]  # flat dotted keys -> values, passed as --config.KEY=VALUE
    seed: int
    sweep: str = ""           # the sweep's name (e.g. "ablation")
    index: int = 0            # the entry's position in the sweep (orders table rows)

    @property
    def config(self) -> str:
        """The `--config` value: `path:arg`."""
        return f"{self.config_path}:{self.arg}"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "label": self.label, "config": self.config,
                "overrides": self.overrides, "seed": self.seed, "sweep": self.sweep,
                "index": self.index}


_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]+")


def _slug(text: str) -> str:
    return _UNSAFE.sub("_", text).strip("_") or "run"


def entry_name(entry: Entry) -> str:
    """A readable name for an entry: its `__name__`, else built from what it changes
    (`__arg__` values, then `lastkey=value` per override), else `base`."""
    if NAME in entry:
        return _slug(str(entry[NAME]))
    parts = [str(v) for v in dict(entry.get(ARG, {})).values()]
    parts += [f"{k.rsplit('.', 1)[-1]}={v}" for k, v in entry.items() if k not in META_KEYS]
    return _slug("-".join(parts)) if parts else "base"


def parse_seeds(seeds: int | str | Sequence[int]) -> list[int]:
    """`3` or `"3"` -> `[0, 1, 2]`; `"0,4,7"` or `[0, 4, 7]` -> `[0, 4, 7]`."""
    if isinstance(seeds, int):
        return list(range(seeds))
    if isinstance(seeds, str):
        return list(range(int(seeds))) if "," not in seeds else [int(s) for s in seeds.split(",") if s]
    return [int(s) for s in seeds]


def entries_to_runs(entries: Sequence[Entry], config_path: str, arg: str, seeds: Sequence[int],
                    sweep: str = "") -> list[Run]:
    """Multiply entries by seeds (seed-major: every entry of seed 0 first, so a sweep cut short
    still covers every configuration) and name them `<name>__seed<s>`."""
    base_arg = parse_arg(arg)
    names = [entry_name(e) for e in entries]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"sweep {sweep!r}: several entries are named {dupes}; give them distinct "
                         f"'{NAME}' values")
    for e in entries:
        if not isinstance(e, Mapping):
            raise TypeError(f"sweep {sweep!r}: an entry must be a dict of overrides, got {e!r}")
    runs: list[Run] = []
    for seed in seeds:
        for index, (entry, name) in enumerate(zip(entries, names)):
            run_arg = {**base_arg, **{k: str(v) for k, v in dict(entry.get(ARG, {})).items()},
                       "seed": str(seed)}
            overrides = {k: v for k, v in entry.items() if k not in META_KEYS}
            runs.append(Run(name=f"{name}__seed{seed}", label=str(entry.get(LABEL, name)),
                            config_path=config_path, arg=format_arg(run_arg), overrides=overrides,
                            seed=seed, sweep=sweep, index=index))
    return runs


def load_config_module(path: str | Path) -> ModuleType:
    """Import a config file (`configs/listops.py`) as a module."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} not found")
    spec = importlib.util.spec_from_file_location(f"_sparseformer_config_{_slug(path.stem)}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def expand_runs(config: str, sweep: str, seeds: int | str | Sequence[int] = 1) -> list[Run]:
    """The runs of sweep `sweep` of `config` (`path:arg`) over `seeds`: calls the config
    file's `get_sweep(sweep, arg)`."""
    path, arg = split_spec(config)
    module = load_config_module(path)
    get_sweep = getattr(module, "get_sweep", None)
    if get_sweep is None:
        raise ValueError(f"{path} defines no get_sweep(name, arg); it cannot be swept")
    entries = list(get_sweep(sweep, arg))
    if not entries:
        raise ValueError(f"sweep {sweep!r} of {path} is empty")
    return entries_to_runs(entries, path, arg, parse_seeds(seeds), sweep=sweep)
