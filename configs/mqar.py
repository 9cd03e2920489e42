"""Multi-query associative recall: a causal LM that must recall the values of many keys.

    sparseformer train --config=configs/mqar.py:attention=rsa,scale=small,seed=0 --workdir=runs/mqar
    sparseformer sweep --config=configs/mqar.py:scale=small --sweep=presets --seeds=2

Decoder-only (causal): presets whose components refuse causal attention are left out of `presets`.
"""

from sparseformer.config import TINY, base_config, sweeps

SCALES = {
    "tiny": {**TINY},
    "small": {
        "batch_size": 32, "num_train_steps": 500, "log_every_steps": 50, "eval_every_steps": 500,
        "checkpoint_every_steps": 500, "num_eval_batches": -1, "model.dropout_rate": 0.0,
        "model.num_layers": 2, "model.num_heads": 2, "model.num_kv_heads": 2, "model.emb_dim": 64, "model.mlp_dim": 128,
        "optimizer.learning_rate": 2e-3, "optimizer.warmup_steps": 50,
        "model.attention.selection.block_size": 16, "model.attention.compression.rank": 32,
    },
    "paper": {
        "batch_size": 64, "num_train_steps": 20000, "eval_every_steps": 2000, "checkpoint_every_steps": 2000,
        "model.num_layers": 2, "model.num_heads": 4, "model.num_kv_heads": 4, "model.emb_dim": 256, "model.mlp_dim": 512,
        "optimizer.learning_rate": 1e-3, "optimizer.warmup_steps": 1000,
    },
}


def get_config(arg: str = ""):
    """`arg`: attention=<preset>,scale=tiny|small|paper,seed=<int>."""
    return base_config("mqar", arg, scales=SCALES)


def get_sweep(name: str, arg: str = ""):
    """`ablation` (components of rsa), `presets` (those this model kind can run), `top_k`."""
    return sweeps("mqar", name, arg, scales=SCALES)
