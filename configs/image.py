"""Image (Long Range Arena): CIFAR-10 as 1024 grayscale pixels, 10 classes (needs the TFDS data prepared).

    sparseformer train --config=configs/image.py:attention=rsa,scale=small,seed=0 --workdir=runs/image
    sparseformer sweep --config=configs/image.py:scale=small --sweep=presets --seeds=2

`paper` follows LRA: 1 layer, 8 heads, width 128, length 1024.
"""

from sparseformer.config import TINY, base_config, sweeps

SCALES = {
    "tiny": {**TINY},
    "small": {
        "batch_size": 32, "num_train_steps": 500, "log_every_steps": 50, "eval_every_steps": 500,
        "checkpoint_every_steps": 500, "num_eval_batches": 10, "model.dropout_rate": 0.1,
        "model.num_layers": 1, "model.num_heads": 4, "model.num_kv_heads": 4, "model.emb_dim": 64, "model.mlp_dim": 128,
        "optimizer.learning_rate": 1e-3, "optimizer.warmup_steps": 50,
        "model.attention.selection.block_size": 64, "model.attention.compression.rank": 64,
    },
    "paper": {
        "batch_size": 128, "num_train_steps": 35000, "eval_every_steps": 5000, "checkpoint_every_steps": 5000,
        "model.num_layers": 1, "model.num_heads": 8, "model.num_kv_heads": 8, "model.emb_dim": 128, "model.mlp_dim": 128,
        "optimizer.learning_rate": 5e-4, "optimizer.warmup_steps": 1000, "model.dropout_rate": 0.3,
    },
}


def get_config(arg: str = ""):
    """`arg`: attention=<preset>,scale=tiny|small|paper,seed=<int>."""
    return base_config("image", arg, scales=SCALES)


def get_sweep(name: str, arg: str = ""):
    """`ablation` (components of rsa), `presets` (those this model kind can run), `top_k`."""
    return sweeps("image", name, arg, scales=SCALES)
