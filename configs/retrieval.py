"""Retrieval: the value of a key queried at the end of a long sequence, planted far away; 10 classes.

    sparseformer train --config=configs/retrieval.py:attention=rsa,scale=small,seed=0 --workdir=runs/retrieval
    sparseformer sweep --config=configs/retrieval.py:scale=small --sweep=ablation --seeds=2

`paper` follows LRA's retrieval sizes: 4 layers, 4 heads, width 128, MLP 512, 4096 tokens. The
classifier reads the last token (`model.pooling = "last"`), where the query is.
Local windows and fixed blocks cannot reach the answer; selection by content can.
`small` (128 tokens, 4 fused pairs over 4 keys, one filler id; ~1 min a run on a CPU): measured
at 200 steps, seed 0, dense 87% and rsa 77% test accuracy, local and compression only 10% (chance).
"""

from sparseformer.config import TINY, base_config, sweeps

SCALES = {
    "tiny": {**TINY},
    "small": {  # 128 tokens in blocks of 8: 16 key blocks, rsa computes 8 of them exactly; ~1 min a run
        "batch_size": 32, "num_train_steps": 250, "log_every_steps": 50, "eval_every_steps": 250,
        "checkpoint_every_steps": 250, "num_eval_batches": -1, "data.max_len": 128,
        "model.num_layers": 2, "model.num_heads": 2, "model.num_kv_heads": 2, "model.emb_dim": 64,
        "model.mlp_dim": 128, "model.dropout_rate": 0.0, "model.pooling": "last",
        "optimizer.learning_rate": 3e-3, "optimizer.warmup_steps": 30,
        "model.attention.selection.block_size": 8, "model.attention.compression.rank": 32,
    },
    "paper": {
        "batch_size": 32, "num_train_steps": 5000, "eval_every_steps": 1000, "checkpoint_every_steps": 1000,
        "model.num_layers": 4, "model.num_heads": 4, "model.num_kv_heads": 4, "model.emb_dim": 128,
        "model.mlp_dim": 512, "optimizer.learning_rate": 5e-4, "optimizer.warmup_steps": 1000,
        "model.pooling": "last",  # the query is the last token
    },
}


def get_config(arg: str = ""):
    """`arg`: attention=<preset>,scale=tiny|small|paper,seed=<int>."""
    return base_config("retrieval", arg, scales=SCALES)


def get_sweep(name: str, arg: str = ""):
    """`ablation` (components of rsa), `presets`, `top_k`."""
    return sweeps("retrieval", name, arg, scales=SCALES)
