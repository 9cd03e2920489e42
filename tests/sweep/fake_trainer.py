"""A stand-in for `python -m sparseformer train` taking the same flags, for the sweep tests.

`--config.fake.mode=` picks what it does: `ok` (default) writes metrics.json; `fail` writes to
stderr and exits 3; `nometrics` exits 0 without metrics; `interrupt` writes a checkpoint and
exits 1. Every call appends its argv to `<workdir>/calls.jsonl`.
"""

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    flags = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    workdir = Path(flags["workdir"])
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / "calls.jsonl", "a") as f:
        f.write(json.dumps(argv) + "\n")
    config_path, arg = flags["config"].split(":", 1)
    arg_dict = dict(kv.split("=", 1) for kv in arg.split(",") if kv)
    mode = flags.get("config.fake.mode", "ok")
    resumed = (workdir / "checkpoints").is_dir()
    print(f"fake trainer in {workdir} mode={mode} resumed={resumed}")
    if mode == "fail":
        print("Traceback: ...\nRuntimeError: boom, a deliberate failure", file=sys.stderr)
        return 3
    if mode == "nometrics":
        return 0
    if mode == "interrupt":
        (workdir / "checkpoints" / "step_5").mkdir(parents=True, exist_ok=True)
        return 1
    seed = int(arg_dict.get("seed", 0))
    metrics = {"task": Path(config_path).stem, "attention": arg_dict.get("attention", "base"), "seed": seed,
               "scale": "tiny", "max_len": 64, "accuracy": 0.5 + 0.1 * seed, "fidelity": 0.01,
               "steps_per_second": 10.0 + seed + len(flags), "peak_memory_bytes": 1000, "num_params": 1,
               "final_loss": 1.0, "num_train_steps": 1, "resumed": resumed}
    (workdir / "metrics.json").write_text(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
