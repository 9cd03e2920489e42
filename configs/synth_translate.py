"""Synthetic translation: a seeded grammar with reordering and a lexicon, long enough that attention cost matters.

    sparseformer train --config=configs/synth_translate.py:attention=rsa,scale=small,seed=0 --workdir=runs/synth_translate
    sparseformer sweep --config=configs/synth_translate.py:scale=small --sweep=presets --seeds=2

Scored by BLEU of greedy decoding (`model.beam_size > 1`: beam search).
"""

from sparseformer.config import TINY, base_config, sweeps

SCALES = {
    "tiny": {**TINY, "model.num_decoder_layers": 1, "model.attention.selection.block_size": 8},
    "small": {
        "batch_size": 32, "num_train_steps": 800, "log_every_steps": 50, "eval_every_steps": 800,
        "checkpoint_every_steps": 800, "num_eval_batches": 4, "model.dropout_rate": 0.0,
        "model.num_layers": 2, "model.num_decoder_layers": 2, "model.num_heads": 4, "model.num_kv_heads": 4,
        "model.emb_dim": 64, "model.mlp_dim": 128, "optimizer.learning_rate": 2e-3, "optimizer.warmup_steps": 50,
        "model.attention.selection.block_size": 16, "model.attention.compression.rank": 32,
    },
    "paper": {
        "batch_size": 64, "num_train_steps": 20000, "eval_every_steps": 2000, "checkpoint_every_steps": 2000,
        "model.num_layers": 4, "model.num_decoder_layers": 4, "model.num_heads": 8, "model.num_kv_heads": 8,
        "model.emb_dim": 512, "model.mlp_dim": 1024, "optimizer.learning_rate": 5e-4, "optimizer.warmup_steps": 1000,
    },
}


def get_config(arg: str = ""):
    """`arg`: attention=<preset>,scale=tiny|small|paper,seed=<int>."""
    return base_config("synth_translate", arg, scales=SCALES)


def get_sweep(name: str, arg: str = ""):
    """`ablation` (components of rsa), `presets` (those this model kind can run), `top_k`."""
    return sweeps("synth_translate", name, arg, scales=SCALES)
