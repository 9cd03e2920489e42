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
# # What did attention select?
#
# For a model trained with `rsa` on the retrieval task (a query at the end of the sequence must
# find its key, planted far away in the first half), we look inside each layer:
#
# 1. the dense attention map of a head, beside the key blocks selection kept and the mass the
#    compressed branch (one pooled summary token per block left out) carried instead;
# 2. the share of dense attention mass that the kept blocks capture, per layer;
# 3. where the needle was, and whether the query's block selected it.
#
# `SCALE = "tiny"` trains for a few seconds (the model has not learned the task yet: the maps
# show what the estimator picks from nearly untrained projections); `"small"` trains a model
# that solves it, and the needle's block lights up.

# %%
SCALE = "tiny"  # "tiny" | "small"
LAYER_SHOWN, HEAD_SHOWN, EXAMPLE_SHOWN = -1, 0, 0

# %%
import os
import sys
import tempfile
from pathlib import Path

ROOT = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "configs" / "listops.py").is_file())
sys.path.insert(0, str(ROOT))  # configs/ is importable from the repository root
WORK = Path(tempfile.mkdtemp(prefix="sparseformer_selected_"))

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

from configs import retrieval
from sparseformer.attention import choose_blocks
from sparseformer.attention.selection import to_blocks
from sparseformer.data import get_task
from sparseformer.data.retrieval import FUSED0, KEY0, NUM_KEYS, NUM_VALUES
from sparseformer.models.layers import empty_aux
from sparseformer.train import train_and_evaluate

if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", str(WORK / "jax_cache"))
STEPS = {"tiny": 40, "small": None}[SCALE]

# %% [markdown]
# ## A trained `rsa` model

# %%
config = retrieval.get_config(f"attention=rsa,scale={SCALE}")
config.data.data_dir = str(WORK / "data")
if STEPS:
    config.num_train_steps = config.log_every_steps = config.checkpoint_every_steps = STEPS
    config.eval_every_steps = 0
rundir = WORK / "retrieval_rsa"
metrics = train_and_evaluate(config, rundir)

# %% [markdown]
# Load the latest checkpoint into an NNX model. (The trainer keeps its state as pure
# dictionaries plus the model's static graph; there is no public `load_model(workdir)` yet, so
# this uses the trainer's own runtime to build the restore target.)

# %%
from sparseformer.train import checkpoint as checkpoint_lib  # noqa: E402
from sparseformer.train import sharding as sharding_lib  # noqa: E402
from sparseformer.train.loop import _Runtime, default_components  # noqa: E402

rt = _Runtime(config, default_components(config), sharding_lib.make_mesh(1, 1, jax.devices()[:1]))
ckpt = checkpoint_lib.Checkpointer(rundir / "checkpoints")
step, state, _, _ = ckpt.restore_latest(rt.plan.abstract.as_dict())
ckpt.close()
model = nnx.merge(rt.plan.graphdef, state["params"], state["extra"])
print(f"restored step {step}; test accuracy {metrics['accuracy']:.3f}, fidelity {metrics['fidelity']:.4f}")

# %% [markdown]
# ## Queries and keys of every layer
#
# We run the encoder block by block and, before each block's attention, recompute its queries
# and keys from the block's own projections. Then, per layer and head:
# - **dense**: the exact attention probabilities, summed over the keys of each key block and
#   averaged over the queries of each query block: a `[query block, key block]` map;
# - **kept**: the blocks `choose_blocks` selects, with the same config and the same fixed PRNG
#   key as `attend` uses at evaluation (`Selection.block_mask()`);
# - **compressed**: `rsa`'s own attention over blocks: the kept blocks exactly, every other block
#   as one pooled token (mean key, logit plus `log b`), all under one softmax normaliser.

# %%
batch = next(iter(get_task("retrieval").pipeline(config, "test", seed=0)))
ids, mask = jnp.asarray(batch["inputs"]), jnp.asarray(batch["inputs_mask"])
sel_cfg = config.model.attention.selection
b = sel_cfg.block_size
rng_sel = jax.random.split(jax.random.key(0), 3)[0]  # what attend uses when rng is None


def analyse(q_BTHD, k_BTHD):
    qh = jnp.swapaxes(q_BTHD, 1, 2) * q_BTHD.shape[-1] ** -0.5  # [B, H, T, D], scaled as attend does
    kh = jnp.swapaxes(k_BTHD, 1, 2)
    B, H, T, D = qh.shape
    n = m = T // b
    s_BHTS = jnp.einsum("bhtd,bhsd->bhts", qh, kh)
    p_BHTS = jax.nn.softmax(s_BHTS, axis=-1)
    qb, kb = to_blocks(qh, b), to_blocks(kh, b)
    sel = choose_blocks(qb, kb, None, jnp.arange(n), num_query_blocks=n, cfg=sel_cfg, causal=False, rng=rng_sel)
    kept_BHnm = sel.block_mask()
    # rsa over blocks: exact log-mass of kept blocks, pooled token logit for the rest
    lse_BHTm = jax.nn.logsumexp(s_BHTS.reshape(B, H, T, m, b), axis=-1)
    pooled_BHTm = jnp.einsum("bhtd,bhmd->bhtm", qh, jnp.mean(kb, axis=3)) + jnp.log(b)
    kept_BHTm = jnp.repeat(kept_BHnm, b, axis=2)
    approx_BHTm = jax.nn.softmax(jnp.where(kept_BHTm, lse_BHTm, pooled_BHTm), axis=-1)
    dense_BHTm = p_BHTS.reshape(B, H, T, m, b).sum(-1)
    per_qblock = lambda x: x.reshape(B, H, n, b, m).mean(3)  # noqa: E731
    return {
        "dense": per_qblock(dense_BHTm), "kept": kept_BHnm,
        "compressed": per_qblock(jnp.where(kept_BHTm, 0.0, approx_BHTm)),
        "captured": jnp.sum(jnp.where(kept_BHTm, dense_BHTm, 0.0), -1),  # [B, H, T]
        "compressed_share": jnp.sum(jnp.where(kept_BHTm, 0.0, approx_BHTm), -1),
        "row_last": p_BHTS[:, :, -1],  # the query token's dense attention row [B, H, S]
    }


stack = model.encoder.stack
x = stack.positions(stack.embed(ids))
layers = []
for block in stack.blocks:
    h = block.norm1(x)
    att = block.self_attn
    layers.append(jax.device_get(analyse(att._proj(h, att.q), att._proj(h, att.k))))
    x, _ = block(x, mask_BL=mask, rng=None, train=False, aux=empty_aux())
print(f"{len(layers)} layers, {ids.shape[1] // b} blocks of {b} tokens, "
      f"{float(np.mean(layers[0]['kept'].sum(-1))):.1f} kept per query block on average (fewer at the edges)")

# %% [markdown]
# ## 1. One head: dense map, kept blocks, compressed mass

# %%
a = layers[LAYER_SHOWN]
e, hd = EXAMPLE_SHOWN, HEAD_SHOWN
fig, axes = plt.subplots(1, 3, figsize=(13, 4))
panels = [("dense attention mass per block", a["dense"][e, hd], "viridis"),
          ("blocks selection kept", a["kept"][e, hd].astype(float), "Greys"),
          ("mass carried by compression", a["compressed"][e, hd], "magma")]
for ax, (title, img, cmap) in zip(axes, panels):
    im = ax.imshow(img, cmap=cmap, aspect="equal")
    ax.set(title=title, xlabel="key block", ylabel="query block")
    fig.colorbar(im, ax=ax, fraction=0.046)
fig.suptitle(f"layer {LAYER_SHOWN % len(layers)}, head {hd}, example {e}")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 2. Share of dense attention mass captured per layer
#
# For every query: the dense attention mass that falls in the blocks selection kept (1.0 would
# mean selection alone is exact), and the share of `rsa`'s attention that the compressed branch
# carries. The gap between the first and one is what compression has to stand in for.

# %%
captured = [float(np.mean(a["captured"])) for a in layers]
comp_share = [float(np.mean(a["compressed_share"])) for a in layers]
uniform = float(np.mean(layers[0]["kept"].sum(-1))) / layers[0]["kept"].shape[-1]
fig, ax = plt.subplots(figsize=(6, 3.5))
xs = np.arange(len(layers))
ax.bar(xs - 0.2, captured, 0.4, label="dense mass in kept blocks")
ax.bar(xs + 0.2, comp_share, 0.4, label="rsa mass on compressed tokens")
ax.axhline(uniform, color="gray", ls="--", label=f"kept fraction of blocks ({uniform:.2f})")
ax.set(xticks=xs, xlabel="layer", ylabel="share of attention mass", ylim=(0, 1.05))
ax.legend(fontsize=8)
plt.show()
for i, (c, s) in enumerate(zip(captured, comp_share)):
    print(f"layer {i}: kept blocks capture {c:.1%} of dense mass; compression carries {s:.1%} of rsa's")

# %% [markdown]
# ## 3. The needle
#
# Each retrieval example plants a few key-value pairs (one token each, `fused` format) in the
# first half; the last token names the key to look up. The needle is the planted token whose
# key is the queried one. Did the last query block (the one holding the query token) keep the
# needle's key block, and how much dense attention does the query token put on it?

# %%
tokens = np.asarray(ids)
queried = tokens[:, -1] - KEY0
is_pair = (tokens >= FUSED0) & (tokens < FUSED0 + NUM_KEYS * NUM_VALUES)
needle = np.argmax(is_pair & ((tokens - FUSED0) // NUM_VALUES == queried[:, None]), axis=1)  # [B]
last = tokens.shape[1] // b - 1
rows = np.arange(len(needle))
logits, _ = model(ids, mask)
correct = np.asarray(jnp.argmax(logits, -1)) == batch["labels"]
for i, a in enumerate(layers):
    found = a["kept"][rows, :, last, needle // b]  # [B, H]
    mass = a["row_last"][rows, :, needle]  # [B, H]
    print(f"layer {i}: needle block kept by some head in {np.mean(found.any(1)):.0%} of examples, "
          f"by every head in {np.mean(found.all(1)):.0%}; dense attention of the query on it: "
          f"{np.mean(mass.max(1)):.3f} (uniform would be {1 / tokens.shape[1]:.3f})")
print(f"model correct on {np.mean(correct):.0%} of these {len(correct)} examples")

a = layers[LAYER_SHOWN]
fig, ax = plt.subplots(figsize=(11, 3))
ax.plot(a["row_last"][e, hd], lw=0.8, label="dense attention of the query token")
for kb_ in np.flatnonzero(a["kept"][e, hd, last]):
    ax.axvspan(kb_ * b, (kb_ + 1) * b, color="tab:green", alpha=0.15, lw=0)
ax.axvline(needle[e], color="tab:red", ls="--",
           label=f"needle at {needle[e]} ({'kept' if a['kept'][e, hd, last, needle[e] // b] else 'missed'})")
ax.set(xlabel="key position (green: blocks kept for the last query block)", ylabel="probability",
       title=f"example {e}, layer {LAYER_SHOWN % len(layers)}, head {hd}; model {'right' if correct[e] else 'wrong'}")
ax.legend(fontsize=8, loc="upper center")
plt.show()
