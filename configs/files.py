"""Your own data: JSON Lines, CSV or TSV files for classification, translation or language modelling.

    sparseformer train --config=configs/files.py:kind=classify,attention=dense,scale=small --workdir=runs/mine \
        --config.data.train_file=train.jsonl [--config.data.eval_file=dev.jsonl] [--config.data.test_file=test.jsonl]
    sparseformer adopt --teacher=runs/mine --attention=rsa --out=runs/mine_adopt
    sparseformer monitor --workdir=runs/mine_adopt/stage2 --input=new.jsonl

`kind=classify` reads `text` and `label` (`--config.data.text_field=`, `--config.data.label_field=`),
`kind=translate` reads `source` and `target`, `kind=lm` reads `text`. Without an eval file a seeded
tenth of the training file is held out for validation (and another for test). Tokens are UTF-8 bytes,
or `--config.data.tokenizer=spm` for a SentencePiece vocabulary trained on the training split
(`pip install 'sparseformer[files]'`). Labels and tokenizer are saved with the run. See
`sparseformer/data/files.py` for every data key.
"""

from sparseformer.config import TINY, base_config, sweeps

TASKS = {"classify": "files_classify", "translate": "files_translate", "lm": "files_lm"}

_SMALL = {  # 2 layers of width 64: minutes on a 2-core CPU at 1024 tokens
    "batch_size": 16, "num_train_steps": 500, "log_every_steps": 25, "eval_every_steps": 250,
    "checkpoint_every_steps": 250, "num_eval_batches": -1,
    "model.num_layers": 2, "model.num_heads": 4, "model.num_kv_heads": 4, "model.emb_dim": 64, "model.mlp_dim": 128,
    "model.dropout_rate": 0.0, "optimizer.learning_rate": 2e-3, "optimizer.warmup_steps": 50,
    "model.attention.selection.block_size": 64, "model.attention.compression.rank": 64,
}
_PAPER = {
    "batch_size": 32, "num_train_steps": 20000, "eval_every_steps": 2000, "checkpoint_every_steps": 2000,
    "model.num_layers": 4, "model.num_heads": 4, "model.num_kv_heads": 4, "model.emb_dim": 256, "model.mlp_dim": 1024,
    "optimizer.learning_rate": 5e-4, "optimizer.warmup_steps": 1000,
}
SCALES = {
    "classify": {"tiny": {**TINY}, "small": dict(_SMALL), "paper": dict(_PAPER)},
    "translate": {
        "tiny": {**TINY, "model.num_decoder_layers": 1, "model.attention.selection.block_size": 8},
        "small": {**_SMALL, "data.max_len": 256, "data.max_target_len": 256, "model.num_decoder_layers": 2,
                  "model.attention.selection.block_size": 16, "model.attention.compression.rank": 32},
        "paper": {**_PAPER, "data.max_len": 512, "data.max_target_len": 512, "model.num_decoder_layers": 4},
    },
    "lm": {"tiny": {**TINY}, "small": dict(_SMALL), "paper": dict(_PAPER)},
}


def _split(arg: str) -> tuple[str, str]:
    """`kind=lm,attention=rsa` -> (`lm`, `attention=rsa`); the kind defaults to `classify`."""
    parts = [p for p in (arg or "").split(",") if p.strip()]
    kinds = [p.split("=", 1)[1].strip() for p in parts if p.split("=", 1)[0].strip() == "kind"]
    kind = kinds[-1] if kinds else "classify"
    if kind not in TASKS:
        raise ValueError(f"kind: {kind!r} is not one of {', '.join(TASKS)}")
    return kind, ",".join(p for p in parts if p.split("=", 1)[0].strip() != "kind")


def get_config(arg: str = ""):
    """`arg`: kind=classify|translate|lm,attention=<preset>,scale=tiny|small|paper,seed=<int>."""
    kind, rest = _split(arg)
    return base_config(TASKS[kind], rest, scales=SCALES[kind])


def get_sweep(name: str, arg: str = ""):
    """`ablation` (components of rsa), `presets` (those the kind's model can run), `top_k`."""
    kind, rest = _split(arg)
    return sweeps(TASKS[kind], name, rest, scales=SCALES[kind])
