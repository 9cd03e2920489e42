# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Adopt `rsa` step by step
#
# The practitioner's path: you have a model trained with dense attention and want to know what
# switching to `rsa` costs and saves, one step at a time.
#
# 1. train a dense model (here on the built-in retrieval task);
# 2. **swap** its attention for `rsa` without training: accuracy and fidelity before any tuning;
# 3. **fine-tune** briefly, distilling from the dense model as teacher;
# 4. one table: accuracy, speed and memory of dense, swapped and fine-tuned, and what the
#    switch saves at longer lengths.
#
# `SCALE = "tiny"` runs in about a minute on a 2-core CPU: a smoke size whose accuracies are near
# chance (10 classes). `"small"` (1024 tokens, a few minutes per run) gives a dense model that
# has learned the task, which is when the swap's accuracy drop and the fine-tune's recovery mean
# something.

# %%
SCALE = "tiny"  # "tiny" | "small"

# %%
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "configs" / "listops.py").is_file())
sys.path.insert(0, str(ROOT))  # configs/ is importable from the repository root
WORK = Path(tempfile.mkdtemp(prefix="sparseformer_adopt_"))

import jax
from IPython.display import Markdown, display

from configs import retrieval
from sparseformer.attention import init_params
from sparseformer.train import train_and_evaluate
from sparseformer.train.loop import config_to_dict, evaluate_workdir

if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", str(WORK / "jax_cache"))

STEPS = {"tiny": 40, "small": None}[SCALE]  # dense training steps (None: the config's)
FINETUNE = {"tiny": 20, "small": 100}[SCALE]  # fine-tuning steps
BENCH_LENGTHS = {"tiny": (1024, 2048), "small": (2048, 4096, 8192)}[SCALE]


def task_config(attention):
    config = retrieval.get_config(f"attention={attention},scale={SCALE}")
    config.data.data_dir = str(WORK / "data")
    if STEPS:  # one layer and a few steps at the tiny scale
        config.model.num_layers = 1
        config.num_train_steps = config.log_every_steps = config.checkpoint_every_steps = STEPS
        config.eval_every_steps = 0
    return config


# %% [markdown]
# ## 1. A dense model

# %%
dense_dir = WORK / "dense"
dense = train_and_evaluate(task_config("dense"), dense_dir)

# %% [markdown]
# ## 2. Swap the attention, keep the weights
#
# The attention core is separate from the projections around it, and `rsa` has no learned
# weights of its own (its gates are off; `init_params` says which it needs), so a dense
# checkpoint fits an `rsa` model unchanged. We copy the run directory, change
# `model.attention` in its `config.json`, and evaluate the same checkpoint.

# %%
rsa_attention = task_config("rsa").model.attention
print("rsa needs these extra parameters:",
      init_params(rsa_attention, jax.random.key(0), num_heads=2, head_dim=16, max_len=256) or "none")


def copy_with_attention(src, dst, attention, **changes):
    """A copy of a run directory whose config uses `attention` (and `changes`); the checkpoints
    come along, metrics.json does not."""
    shutil.copytree(src, dst)
    (dst / "metrics.json").unlink()
    config = task_config("dense")
    config.model.attention = attention
    config.attention_name = changes.pop("name")
    for key, value in changes.items():
        *parents, last = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[last] = value
    (dst / "config.json").write_text(json.dumps(config_to_dict(config)))
    return config


swapped_dir = WORK / "swapped"
copy_with_attention(dense_dir, swapped_dir, rsa_attention, name="rsa (swapped)")
swapped = evaluate_workdir(swapped_dir, "test")
print(f"dense accuracy {dense['accuracy']:.3f} -> swapped to rsa {swapped['accuracy']:.3f}; "
      f"fidelity KL(dense || rsa) {swapped['fidelity']:.4f}")

# %% [markdown]
# Fidelity is the KL divergence from the dense attention rows to `rsa`'s, on 16 sampled query
# rows per layer, averaged over layers: how much the swapped model's attention differs from the
# one its weights were trained for.
#
# ## 3. Fine-tune briefly, distilling from the dense teacher
#
# The fine-tune resumes the dense checkpoint (weights, optimizer and data position) with `rsa`
# attention and `FINETUNE` more steps, adding a KL to the dense teacher's logits
# (`config.distill.teacher_workdir`, `config.distill.weight`). The learning rate continues the
# dense run's cosine schedule stretched to the new end, so it is already low: a gentle tune.

# %%
finetuned_dir = WORK / "finetuned"
ft_config = copy_with_attention(
    dense_dir, finetuned_dir, rsa_attention, name="rsa (fine-tuned)",
    num_train_steps=dense["num_train_steps"] + FINETUNE, log_every_steps=FINETUNE,
    checkpoint_every_steps=FINETUNE, **{"distill.teacher_workdir": str(dense_dir), "distill.weight": 1.0})
finetuned = train_and_evaluate(ft_config, finetuned_dir)

# %% [markdown]
# ## 4. What the switch saves at longer lengths
#
# At the task's length attention is a small part of the step. The benchmark measures the
# attention alone, forward and backward (what a training step pays), for dense and `rsa` at
# longer lengths: median time after warm-up, and XLA's compiled memory.

# %%
from sparseformer.bench.runner import BenchOptions, run  # noqa: E402


class Quiet:  # the benchmark's progress bar, silenced
    def __getattr__(self, name):
        return lambda *a, **k: None


bench = run(BenchOptions(presets=("dense", "rsa"), lengths=BENCH_LENGTHS, passes=("fwd_bwd",), repeats=3,
                         rss="none", fidelity=False), progress=Quiet())
by = {(r["preset"], r["length"]): r for r in bench["results"]}

# %% [markdown]
# ## The table

# %%
MiB = 2**20
L = dense["max_len"]


def cell(x, fmt):
    return "—" if x is None else format(x, fmt)


rows = [
    ("dense, trained", L, dense["accuracy"], None, cell(dense["steps_per_second"], ".1f") + " steps/s",
     cell(dense["peak_memory_bytes"] / MiB, ".1f") + " MiB"),
    ("rsa, swapped (no training)", L, swapped["accuracy"], swapped["fidelity"], "—", "—"),
    ("rsa, fine-tuned with distillation", L, finetuned["accuracy"], finetuned["fidelity"],
     cell(finetuned["steps_per_second"], ".1f") + " steps/s*", cell(finetuned["peak_memory_bytes"] / MiB, ".1f") + " MiB*"),
]
for n in BENCH_LENGTHS:
    d, r = by[("dense", n)], by[("rsa", n)]
    speed = (f"{d['median_ms']:.0f} → {r['median_ms']:.0f} ms ({d['median_ms'] / r['median_ms']:.1f}× faster)"
             if d["median_ms"] and r["median_ms"] else "—")
    memory = (f"{d['compiled_bytes'] / MiB:.0f} → {r['compiled_bytes'] / MiB:.0f} MiB "
              f"({r['compiled_bytes'] / d['compiled_bytes']:.2f}× dense)" if d["compiled_bytes"] and r["compiled_bytes"] else "—")
    rows.append(("attention alone, dense → rsa, fwd+bwd", n, None, None, speed, memory))

lines = ["| model | length | accuracy (%) | fidelity (KL) | speed | memory |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
for name, n, acc, fid, speed, memory in rows:
    lines.append(f"| {name} | {n} | {cell(None if acc is None else 100 * acc, '.1f')} | {cell(fid, '.4f')} | {speed} | {memory} |")
display(Markdown("\n".join(lines) + "\n\n*the fine-tune's step also runs the dense teacher's forward pass. "
                 f"Attention alone: B=1, 4 heads of 64, float32, {jax.default_backend()}."))

# %% [markdown]
# Reading it: the swap needs no training and no new weights; its fidelity says how far its
# attention is from the one the model was trained with, and the fine-tune (a few steps with the
# teacher) pulls it back. At the task's length the training step barely changes: attention is a
# small part of it. The last rows are why one switches: attention's time and memory grow with
# the square of the length for dense and about linearly for `rsa`.
