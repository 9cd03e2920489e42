"""LM1B: byte-level causal language model on One Billion Word sentences (needs the TFDS data prepared).

    sparseformer train --config=configs/lm1b.py:attention=rsa,scale=small,seed=0 --workdir=runs/lm1b
    sparseformer sweep --config=configs/lm1b.py:scale=small --sweep=presets --seeds=2

Scored by perplexity per byte. Presets that refuse causal attention are left out of `presets`.
"""

from sparseformer.config import TINY, base_config, sweeps

SCALES = {
    "tiny": {**TINY},
    "small": {
        "batch_size": 32, "num_train_steps": 1000, "log_every_steps": 50, "eval_every_steps": 1000,
        "checkpoint_every_steps": 1000, "num_eval_batches": 10,
        "model.num_layers": 2, "model.num_heads": 4, "model.num_kv_heads": 4, "model.emb_dim": 128, "model.mlp_dim": 256,
        "optimizer.learning_rate": 1e-3, "optimizer.warmup_steps": 100,
        "model.attention.selection.block_size": 16, "model.attention.compression.rank": 32,
    },
    "paper": {
        "batch_size": 128, "num_train_steps": 100000, "eval_every_steps": 5000, "checkpoint_every_steps": 5000,
        "model.num_layers": 6, "model.num_heads": 8, "model.num_kv_heads": 8, "model.emb_dim": 512, "model.mlp_dim": 2048,
        "optimizer.learning_rate": 1e-3, "optimizer.warmup_steps": 4000, "optimizer.schedule": "inverse_sqrt",
    },
}


def get_config(arg: str = ""):
    """`arg`: attention=<preset>,scale=tiny|small|paper,seed=<int>."""
    return base_config("lm1b", arg, scales=SCALES)


def get_sweep(name: str, arg: str = ""):
    """`ablation` (components of rsa), `presets` (those this model kind can run), `top_k`."""
    return sweeps("lm1b", name, arg, scales=SCALES)
