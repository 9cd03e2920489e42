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
# # Adopt sparse attention step by step, on your own files
#
# The practitioner's path, one command at a time:
#
# 1. **your data**: JSON Lines files (here a generated long-document task: a status stated near the
#    start of a report, asked about at its end);
# 2. **a dense run** on them (`configs/files.py`);
# 3. **`sparseformer adopt`**: stage 0 measures the dense model, stage 1 swaps its attention for
#    `rsa` without training, stage 2 fine-tunes it briefly with the dense model as teacher, stage 3
#    measures longer inputs; then a go/no-go verdict against your thresholds;
# 4. **`sparseformer monitor`**: once it runs, check new inputs against what training saw.
#
# This notebook calls the library functions the commands call (`sparseformer.adopt.adopt`,
# `sparseformer.monitor.monitor`), stage by stage. `SCALE = "tiny"` runs in a few minutes on a
# 2-core CPU: a smoke size at which the model learns nothing (accuracies near chance, speed-ups
# meaningless at 128 tokens). `"small"` is the measured setting of experiments/README.md (1024
# tokens; dense training takes a while on a CPU).

# %%
SCALE = "tiny"  # "tiny" | "small"

# %%
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "configs" / "files.py").is_file())
sys.path.insert(0, str(ROOT))  # configs/ is importable from the repository root
WORK = Path(tempfile.mkdtemp(prefix="sparseformer_adopt_"))

import jax
from IPython.display import Image, Markdown, display

from configs import files
from sparseformer.adopt import AdoptOptions, adopt
from sparseformer.data.longdoc import write_dataset
from sparseformer.monitor import format_table, monitor
from sparseformer.train import train_and_evaluate

if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", str(WORK / "jax_cache"))

SIZES = {  # documents, words per document, tokens kept, dense steps, fine-tuning steps, stage-3 lengths
    "tiny": dict(num_train=400, num_eval=64, num_words=100, max_len=128, steps=20, finetune=4, lengths=(256,)),
    "small": dict(num_train=8000, num_eval=500, num_words=960, max_len=1024, steps=400, finetune=100,
                  lengths=(2048, 4096)),
}[SCALE]

# %% [markdown]
# ## 1. Your data
#
# Three JSON Lines files with a `text` and a `label` per line. Any other field names work too
# (`--config.data.text_field=...`), and so do CSV or TSV files with a header row.

# %%
data = write_dataset(WORK / "longdoc", num_train=SIZES["num_train"], num_eval=SIZES["num_eval"],
                     num_words=SIZES["num_words"])
first = json.loads(data["train"].read_text().splitlines()[0])
print(f"label {first['label']!r}: {first['text'][:120]} ... {first['text'][-60:]}")

# %% [markdown]
# ## 2. A dense run
#
# The same as `sparseformer train --config=configs/files.py:kind=classify,attention=dense,scale=...
# --config.data.train_file=... --workdir=...`. The tokenizer is a SentencePiece model trained on
# the training file; it and the label map are saved with the run, and every later step reads them
# from there.

# %%
config = files.get_config(f"kind=classify,attention=dense,scale={SCALE}")
config.data.train_file, config.data.eval_file, config.data.test_file = (str(data[k]) for k in ("train", "dev", "test"))
config.data.update(tokenizer="spm", tokenizer_type="bpe", tokenizer_vocab_size=1000, max_len=SIZES["max_len"])
config.model.pooling = "last"  # the question is at the end
config.num_train_steps = SIZES["steps"]
config.eval_every_steps = 0
if SCALE == "tiny":
    config.model.attention.selection.block_size = 8  # 16 blocks of 8 at 128 tokens: rsa computes half of them
dense_dir = WORK / "dense"
dense = train_and_evaluate(config, dense_dir)
print(f"dense accuracy {dense['accuracy']:.3f}; labels {json.loads((dense_dir / 'config.json').read_text())['data']['labels']}")

# %% [markdown]
# ## 3. `sparseformer adopt`, one stage at a time
#
# `sparseformer adopt --teacher=DIR --attention=rsa --out=OUT` runs every stage in one go; here we stop
# after each one to look at it. Each stage writes `OUT/stage<N>.json` when it is done, and a re-run
# skips the stages whose inputs did not change: calling `adopt` again below continues where the
# previous call stopped.

# %%
options = AdoptOptions(teacher=str(dense_dir), out=str(WORK / "adopt"), attention="rsa", steps=SIZES["finetune"],
                       max_metric_drop=1.0, min_speedup=2.0, lengths=SIZES["lengths"], price_per_hour=0.40,
                       repeats=5 if SCALE == "tiny" else 20, rss=SCALE != "tiny")
stages = adopt(options, stop_after="stage0")["stages"]
s0 = stages["stage0"]
print(f"stage 0, dense: accuracy {s0['value']:.3f}; batch-1 latency {s0['speed']['latency_ms_p50']:.1f} ms, "
      f"throughput {s0['speed']['throughput_per_s']:.0f}/s, compiled memory {s0['speed']['compiled_bytes'] / 2**20:.1f} MiB")

# %% [markdown]
# **Stage 1** puts `rsa` in place of dense attention and changes nothing else: `rsa` has no weights
# of its own, so the dense checkpoint fits it. Fidelity is the KL from each dense attention row to
# `rsa`'s (on sampled rows), captured mass is the share of `rsa`'s attention computed exactly (the
# rest comes from pooled block summaries), agreement is how often its predictions match dense.

# %%
s1 = adopt(options, stop_after="stage1")["stages"]["stage1"]
print(f"stage 1, swapped: accuracy {s1['value']:.3f} (drop {s1['metric_drop']:.2f} points), agreement with dense "
      f"{s1['agreement']:.3f}, {s1['latency_speedup']:.2f}x dense's speed (batch-1 latency)")
for i, (f, c) in enumerate(zip(s1["layer_fidelity"], s1["layer_captured"])):
    print(f"  layer {i}: fidelity per head {[round(x, 4) for x in f]}, captured {[round(x, 3) for x in c]}")

# %% [markdown]
# **Stage 2** fine-tunes the swapped model for `steps` steps from the dense checkpoint (weights,
# optimizer and data position), adding a KL to the dense teacher's predictions
# (`config.distill`): the one trainer, in `OUT/stage2/`, a normal run directory. **Stage 3**
# measures both models at longer lengths, where attention's share of the work grows.

# %%
report = adopt(options)
display(Markdown((WORK / "adopt" / "report.md").read_text()))

# %%
for name in report["plots"]:
    display(Image(filename=str(WORK / "adopt" / name)))

# %% [markdown]
# ## 4. `sparseformer monitor`
#
# The fine-tuned run stored, at the end of its training, the fidelity, captured mass and agreement it
# had on training data (`monitor_reference.json`). `monitor` measures the same on new inputs (no
# labels needed) and exits with status 1 and a one-line reason when a threshold is crossed, for a
# scheduled job to alert on. Here: the training file, then drifted reports whose filler now also
# holds status words all over the document (a fifth of its words), where dense attention spreads
# over many blocks and `rsa`'s chosen ones capture less of it. (A milder drift, 2% of the words, is
# one the adopted model still follows: at `small` scale its fidelity rises but stays inside the
# thresholds, `experiments/adopt_longdoc.py`.)

# %%
stage2_dir = report["stages"]["stage2"]["run_dir"]
same = monitor(stage2_dir, input=str(data["train"]), sample=64)
print(format_table(same["rows"]), "\n->", "ok" if same["ok"] else same["reason"])
shifted = write_dataset(WORK / "shifted", num_train=64, num_eval=1, num_words=SIZES["num_words"], distractors=0.2,
                        seed=1)
drift = monitor(stage2_dir, input=str(shifted["train"]), sample=64)
print(format_table(drift["rows"]), "\n->", "ok" if drift["ok"] else drift["reason"])

# %% [markdown]
# Reading it: the verdict is only as good as its thresholds and its length. Stage 1 shows what the
# swap costs before any training; stage 2 is what you would deploy; stage 3 shows where the switch
# pays (at short lengths attention is a small part of the work, and the block-sparse kernel's
# overheads can make it slower). The monitor then tells you when the inputs move away from what the
# sparse attention was checked on.
