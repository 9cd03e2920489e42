"""Text (Long Range Arena): IMDB reviews as bytes, positive or negative (needs the TFDS data prepared).

    sparseformer train --config=configs/text.py:attention=rsa,scale=small,seed=0 --workdir=runs/text
    sparseformer sweep --config=configs/text.py:scale=small --sweep=presets --seeds=2

`paper` follows LRA: 4 layers, 4 heads, width 256, MLP 1024, 4000 bytes (4096).
"""

from sparseformer.config import TINY, base_config, sweeps

SCALES = {
    "tiny": {**TINY},
    "small": {
        "batch_size": 32, "num_train_steps": 500, "log_every_steps": 50, "eval_every_steps": 500,
        "checkpoint_every_steps": 500, "num_eval_batches": 10, "model.dropout_rate": 0.1,
        "model.num_layers": 2, "model.num_heads": 4, "model.num_kv_heads": 4, "model.emb_dim": 64, "model.mlp_dim": 128,
        "optimizer.learning_rate": 1e-3, "optimizer.warmup_steps": 50,
        "model.attention.selection.block_size": 64, "model.attention.compression.rank": 64,
    },
    "paper": {
        "batch_size": 32, "num_train_steps": 20000, "eval_every_steps": 2000, "checkpoint_every_steps": 2000,
        "model.num_layers": 4, "model.num_heads": 4, "model.num_kv_heads": 4, "model.emb_dim": 256, "model.mlp_dim": 1024,
        "optimizer.learning_rate": 5e-4, "optimizer.warmup_steps": 1000, "optimizer.weight_decay": 0.1,
    },
}


def get_config(arg: str = ""):
    """`arg`: attention=<preset>,scale=tiny|small|paper,seed=<int>."""
    return base_config("text", arg, scales=SCALES)


def get_sweep(name: str, arg: str = ""):
    """`ablation` (components of rsa), `presets` (those this model kind can run), `top_k`."""
    return sweeps("text", name, arg, scales=SCALES)
