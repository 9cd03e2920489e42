"""Planted run directories (run.json + metrics.json) with numbers chosen for hand-computed tables."""

import json
from pathlib import Path


def plant(root: Path, name: str, *, label: str, task: str, seed: int, index: int = 0, sweep: str = "",
          **metrics) -> Path:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "run.json").write_text(json.dumps({"name": name, "label": label, "config": f"configs/{task}.py:",
                                            "overrides": {}, "seed": seed, "sweep": sweep, "index": index}))
    (d / "metrics.json").write_text(json.dumps({"task": task, "attention": label, "seed": seed,
                                                "scale": "tiny", **metrics}))
    return d


# Layout 1: accuracy of listops and text per preset, 3 seeds each.
TASKS = {
    # label: {task: [acc per seed]}
    "dense": {"listops": [0.30, 0.40, 0.50], "text": [0.60, 0.62, 0.64]},
    "local": {"listops": [0.20, 0.20, 0.20], "text": [0.70, 0.71, 0.72]},
    "rsa": {"listops": [0.36, 0.38, 0.40], "text": [0.65, 0.65, 0.68]},
}


def plant_tasks(root: Path) -> None:
    for index, (label, per_task) in enumerate(TASKS.items()):
        for task, accs in per_task.items():
            for seed, acc in enumerate(accs):
                plant(root / task, f"{label}__seed{seed}", label=label, task=task, seed=seed, index=index,
                      sweep="presets", max_len=1024, accuracy=acc, steps_per_second=10.0 * (index + 1),
                      fidelity=0.1, peak_memory_bytes=1e6)


# Layout 2: steps/s and memory at 1K and 2K, dense and rsa, 2 seeds.
SPEED = {  # (label, length): ([steps/s per seed], [memory per seed])
    ("dense", 1024): ([10.0, 10.0], [100.0, 100.0]),
    ("rsa", 1024): ([20.0, 30.0], [50.0, 50.0]),
    ("dense", 2048): ([4.0, 6.0], [400.0, 400.0]),
    ("rsa", 2048): ([15.0, 15.0], [100.0, 300.0]),
}


def plant_speed(root: Path) -> None:
    for (label, length), (speeds, mems) in SPEED.items():
        for seed, (s, m) in enumerate(zip(speeds, mems)):
            plant(root, f"{label}-{length}__seed{seed}", label=label, task="text", seed=seed,
                  index=0 if label == "dense" else 1, sweep="speed", max_len=length, accuracy=0.5,
                  steps_per_second=s, peak_memory_bytes=m, fidelity=0.0)


# Layout 3: ablation on listops (accuracy) and lm (perplexity), 2 seeds.
ABLATION = {  # label: (listops acc, listops fid, speed, mem, lm ppl)
    "dense": ([0.40, 0.44], [0.0, 0.0], [10.0, 10.0], [200.0, 200.0], [20.0, 22.0]),
    "selection only": ([0.30, 0.34], [0.5, 0.7], [30.0, 40.0], [50.0, 50.0], [30.0, 30.0]),
    "rsa": ([0.42, 0.46], [0.1, 0.2], [20.0, 25.0], [100.0, 100.0], [19.0, 21.0]),
}


def plant_ablation(root: Path) -> None:
    for index, (label, (acc, fid, sps, mem, ppl)) in enumerate(ABLATION.items()):
        for seed in range(2):
            plant(root / "listops", f"{index}__seed{seed}", label=label, task="listops", seed=seed, index=index,
                  sweep="ablation", max_len=512, accuracy=acc[seed], fidelity=fid[seed],
                  steps_per_second=sps[seed], peak_memory_bytes=mem[seed])
            plant(root / "lm", f"{index}__seed{seed}", label=label, task="lm", seed=seed, index=index,
                  sweep="ablation", max_len=512, perplexity=ppl[seed], fidelity=fid[seed],
                  steps_per_second=sps[seed] / 2, peak_memory_bytes=mem[seed] * 2)
