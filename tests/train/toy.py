"""A small task, model kind and model for the trainer tests (the real ones live elsewhere).

The task: classify a sequence of ids by `sum(ids) % num_classes`; batches are a pure function of
(seed, split, batch index, process slice), so iterator state is `{"next_index": n}`. Setting
`config.data.nan_at` to a batch index plants a NaN in that training batch (a float key `poison`).
The model has parameters named with every logical axis the rules map (`vocab`, `embed`, `mlp`,
`heads`), sized so that a 2x4 mesh splits them.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from sparseformer.train.loop import Components

VOCAB, CLASSES = 32, 4


def partitioned(init: Any, names: tuple[str | None, ...]) -> Any:
    return nnx.with_partitioning(init, names)


class ToyModel(nnx.Module):
    def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        d, m, h = config.model.embed_dim, config.model.mlp_dim, config.model.num_heads
        self.dtype = jnp.dtype(config.model.dtype)
        self.dropout = float(config.model.dropout)
        normal = nnx.initializers.normal(0.1)
        self.embed = nnx.Param(partitioned(normal, ("vocab", "embed"))(rngs.params(), (VOCAB, d)))
        self.qkv = nnx.Param(partitioned(normal, ("embed", "heads", "kv"))(rngs.params(), (d, h, d // h)))
        self.up = nnx.Linear(d, m, kernel_init=partitioned(nnx.initializers.lecun_normal(), ("embed", "mlp")),
                             bias_init=partitioned(nnx.initializers.zeros, ("mlp",)), rngs=rngs)
        self.down = nnx.Linear(m, d, kernel_init=partitioned(nnx.initializers.lecun_normal(), ("mlp", "embed")), rngs=rngs)
        self.norm = nnx.LayerNorm(d, rngs=rngs)
        self.head = nnx.Linear(d, CLASSES, rngs=rngs)

    def __call__(self, ids: jax.Array, mask: jax.Array, rng: jax.Array | None) -> jax.Array:
        x = self.embed[...][ids].astype(self.dtype)  # [b, L, d]
        a = jnp.einsum("bld,dhk->blhk", x, self.qkv[...].astype(self.dtype)).reshape(x.shape)
        x = x + jnp.tanh(a)
        h = jax.nn.gelu(self.up(x))
        if rng is not None and self.dropout > 0:  # exercises the per-step RNG
            h = h * jax.random.bernoulli(rng, 1 - self.dropout, h.shape) / (1 - self.dropout)
        x = self.norm(x + self.down(h))
        pooled = jnp.sum(x * mask[..., None], 1) / jnp.maximum(jnp.sum(mask, 1, keepdims=True), 1)
        return self.head(pooled).astype(jnp.float32)


class ToyKind:
    @staticmethod
    def logits(model: ToyModel, batch: dict, *, rng: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
        logits = model(batch["inputs"], batch["inputs_mask"], rng if train else None)
        return logits, batch["example_mask"]

    @staticmethod
    def loss(model: ToyModel, batch: dict, *, rng: jax.Array, train: bool) -> tuple[jax.Array, dict]:
        logits, w = ToyKind.logits(model, batch, rng=rng, train=train)
        w = w.astype(jnp.float32)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["labels"][:, None], 1)[:, 0]
        if "poison" in batch:
            nll = nll + batch["poison"]
        count = jnp.sum(w)
        loss = jnp.sum(nll * w) / jnp.maximum(count, 1)
        acc = jnp.sum((jnp.argmax(logits, -1) == batch["labels"]) * w)
        return loss, {"loss": (jnp.sum(nll * w), count), "accuracy": (acc, count),
                      "aux_loss": (jnp.zeros(()), 1.0), "fidelity": (jnp.zeros(()), 1.0)}


class ToyIterator:
    def __init__(self, config: ml_collections.ConfigDict, split: str, seed: int, index: int, count: int):
        self.b = config.batch_size // count
        self.L = config.data.max_len
        self.seed, self.split, self.index, self.count = seed, split, index, count
        self.train = split == "train"
        self.num = None if self.train else config.data.eval_batches
        self.nan_at = config.data.get("nan_at", -1) if self.train else -1
        self.delay = config.data.get("delay", 0.0) if self.train else 0.0
        self.next_index = 0

    def __iter__(self) -> "ToyIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        n = self.next_index
        if self.num is not None and n >= self.num:
            raise StopIteration
        self.next_index += 1
        if self.delay:
            time.sleep(self.delay)  # slow enough for a test to kill it mid-run
        rows = np.arange(self.b) + self.index * self.b  # this process's rows of the global batch
        salt = {"train": 0, "validation": 1, "test": 2}[self.split]
        ids = np.stack([np.random.default_rng([self.seed, salt, n, r]).integers(1, VOCAB, self.L) for r in rows])
        ids = ids.astype(np.int32)
        batch = {"inputs": ids, "inputs_mask": np.ones_like(ids, bool), "labels": (ids.sum(1) % CLASSES).astype(np.int32),
                 "example_mask": np.ones((self.b,), bool)}
        if self.train and self.nan_at >= 0:
            batch["poison"] = np.full((self.b,), np.nan if n == self.nan_at else 0.0, np.float32)
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"next_index": self.next_index}

    def set_state(self, state: dict[str, Any]) -> None:
        self.next_index = int(state["next_index"])


class ToyTask:
    name, kind, metric, metrics = "toy", "classifier", "accuracy", ("accuracy",)

    def pipeline(self, config: ml_collections.ConfigDict, split: str, *, seed: int, process_index: int = 0,
                 process_count: int = 1) -> ToyIterator:
        return ToyIterator(config, split, seed, process_index, process_count)


COMPONENTS = Components(task=ToyTask(), kind=ToyKind(), build_model=lambda config, rngs: ToyModel(config, rngs=rngs))


def toy_config(**overrides: Any) -> ml_collections.ConfigDict:
    """The agreed run keys, with a toy model and data block."""
    c = ml_collections.ConfigDict()
    c.task, c.scale, c.seed, c.attention_name = "toy", "tiny", 0, "dense"
    c.batch_size, c.num_train_steps = 16, 12
    c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps, c.max_checkpoints_to_keep = 1, 0, 4, 3
    c.num_eval_batches = -1
    c.data = ml_collections.ConfigDict(dict(max_len=8, eval_batches=2, nan_at=-1, delay=0.0))
    c.model = ml_collections.ConfigDict(dict(kind="toy", embed_dim=16, mlp_dim=32, num_heads=4, dropout=0.1, dtype="float32",
                                             param_dtype="float32"))
    c.optimizer = ml_collections.ConfigDict(dict(name="adamw", learning_rate=3e-3, warmup_steps=2, schedule="cosine",
                                                 weight_decay=0.01, b1=0.9, b2=0.98, grad_clip_norm=1.0,
                                                 grad_accum_steps=1))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, model=1))
    c.logical_axis_rules = (("batch", "data"), ("vocab", "model"), ("embed", None), ("mlp", "model"),
                            ("heads", "model"), ("kv", None))
    c.distill = ml_collections.ConfigDict(dict(teacher_workdir="", weight=0.0, temperature=1.0))
    for key, value in overrides.items():
        node = c
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return c
