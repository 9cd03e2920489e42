"""A config file for the sweep tests: only sweeps (the fake trainer needs no config)."""

from sparseformer.sweep import expand


def get_config(arg: str):  # pragma: no cover (the fake trainer does not read it)
    raise NotImplementedError


def get_sweep(name: str, arg: str) -> list[dict]:
    del arg
    return expand.pick(name, {
        # every row, without asking the preset registry which estimator rsa uses
        "ablation": lambda: expand.ablation_sweep(default_estimator=None),
        "presets": lambda: expand.presets_sweep(["dense", "local", "rsa"]),
        "mixed": [{"fake.mode": "ok", "__name__": "good"}, {"fake.mode": "fail", "__name__": "bad"},
                  {"fake.mode": "nometrics", "__name__": "silent"}, {"fake.mode": "ok", "__name__": "good2"}],
        "interrupt": [{"fake.mode": "interrupt", "__name__": "cut"}],
        "grid": lambda: expand.product(expand.axis("a", [1, 2]), expand.axis("b", ["x", "y"])),
    })
