"""The run config shared by every task config file, and its whole-config validation.

A config file is a short call to `base_config` plus its per-scale table:

    def get_config(arg: str = "") -> ml_collections.ConfigDict:
        return base_config("listops", arg, scales=SCALES)

`arg` is `attention=<preset>,scale=tiny|small|paper,seed=<int>` (each optional). A scale
table maps each scale to flat dotted overrides (`{"model.num_layers": 2, ...}`), applied on
top of the defaults below, the task's `default_data_config(scale)` and the attention preset.

`validate_config(config)` checks everything before anything compiles and raises one
`ValueError` naming the full key, the bad value and what is allowed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections

from sparseformer import attention as attention_lib
from sparseformer.attention import config as attention_config
from sparseformer.attention import presets
from sparseformer.models.encoder import POOLINGS
from sparseformer.sweep import expand

SCALES = ("tiny", "small", "paper")
ARG_KEYS = {"attention": "rsa", "scale": "small", "seed": "0"}  # config argument keys and their defaults
POSITIONS = ("learned", "sinusoidal")
DTYPES = ("float32", "bfloat16")
PARAM_DTYPES = ("float32",)
CROSS_ATTENTION = ("dense", "same")
# Used when sparseformer.train (which owns these registries) cannot be imported.
OPTIMIZERS = ("adamw", "adafactor", "sgd")
SCHEDULES = ("cosine", "inverse_sqrt", "constant")

LOGICAL_AXIS_RULES = (
    ("batch", "data"),  # examples are split over the data axis
    ("embed", None),  # the model width is replicated
    ("heads", "model"),  # attention heads are split over the model axis
    ("kv_heads", None),  # key/value heads (grouped-query attention: often fewer than the model axis)
    ("kv", None),  # the head dimension
    ("mlp", "model"),  # the MLP hidden units
    ("vocab", "model"),  # the vocabulary (embedding rows, output logits)
)


# Shared by every config's `tiny` scale: a forward and backward pass in seconds (tests).
TINY: dict[str, Any] = {
    "batch_size": 8, "num_train_steps": 4, "log_every_steps": 2, "eval_every_steps": 4,
    "checkpoint_every_steps": 4, "num_eval_batches": 2, "optimizer.warmup_steps": 1,
    "model.num_layers": 2, "model.num_heads": 2, "model.num_kv_heads": 2, "model.emb_dim": 32, "model.mlp_dim": 64,
    "model.attention.selection.block_size": 16,  # 8+ key blocks at length 128: rsa's budget of 8 fits
    "model.attention.compression.rank": 16,  # performer features, nystrom landmarks, linformer length
}


def parse_arg(arg: str) -> dict[str, Any]:
    """`"attention=rsa,scale=tiny,seed=1"` -> `{"attention": "rsa", "scale": "tiny", "seed": 1}`, defaults filled in."""
    given = expand.parse_arg(arg or "")
    for key in given:
        if key not in ARG_KEYS:
            raise ValueError(f"config argument {key!r} (in {arg!r}) is not one of {', '.join(ARG_KEYS)}")
    out: dict[str, Any] = {**ARG_KEYS, **given}
    if out["scale"] not in SCALES:
        raise ValueError(f"scale: {out['scale']!r} is not one of {', '.join(SCALES)}")
    if out["attention"] not in presets.names():
        raise ValueError(f"attention: {out['attention']!r} is not one of {', '.join(presets.names())}")
    try:
        out["seed"] = int(out["seed"])
    except ValueError:
        raise ValueError(f"seed: {out['seed']!r} is not an integer") from None
    return out


def _model(task: Any, attention: str) -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.kind = task.kind  # classifier, dual_encoder, seq2seq or lm (from the task)
    m.vocab_size = int(task.vocab_size)  # token ids are < vocab_size (from the task)
    m.num_classes = int(task.num_classes)  # classifier outputs (0 for token-level tasks)
    m.max_len = 0  # input length: set to data.max_len (a reference, so overriding data.max_len follows)
    m.num_layers = 2  # encoder (or decoder-only) blocks
    m.num_heads = 4  # query heads
    m.num_kv_heads = 4  # key/value heads (fewer: grouped-query attention)
    m.emb_dim = 128  # model width
    m.mlp_dim = 256  # MLP hidden width
    m.dropout_rate = 0.1  # dropout on embeddings, residual branches and MLP activations
    m.positions = "learned"  # learned or sinusoidal
    m.dtype = "float32"  # compute dtype: float32 or bfloat16
    m.param_dtype = "float32"  # parameters are kept in float32
    m.label_smoothing = 0.0  # label smoothing of the cross-entropy
    if task.kind in ("classifier", "dual_encoder"):
        m.pooling = "mean"  # mean (over unpadded tokens) or cls (a learned first token)
    if task.kind == "seq2seq":
        m.max_target_len = 0  # decoder length: set to data.max_target_len (a reference)
        m.num_decoder_layers = 2  # decoder blocks
        m.cross_attention = "dense"  # dense, or same (the model.attention config; see models/seq2seq.py)
        m.beam_size = 1  # 1: greedy decoding; more: beam search
        m.length_penalty = 0.6  # GNMT length penalty exponent of beam search
        # a decoded output ends (EOS) by decode_len_ratio x its source's tokens + decode_len_extra, and
        # by max_target_len in any case (decode_len_ratio 0: max_target_len only)
        m.decode_len_ratio = 0.0
        m.decode_len_extra = 10
        m.bos_id = int(task.bos_id)  # decoder start token (from the task)
        m.eos_id = int(task.eos_id)  # end of sequence (from the task)
    m.attention = presets.get(attention)  # the attention core: a preset, adjusted per scale
    return m


def base_config(task_name: str, arg: str, *, scales: Mapping[str, Mapping[str, Any]]) -> ml_collections.ConfigDict:
    """The run config of `task_name` for `arg`, with `scales[scale]` (flat dotted keys) applied."""
    from sparseformer.data import get_task  # noqa: PLC0415 (keeps `import sparseformer.config` light)

    a = parse_arg(arg)
    task = get_task(task_name)
    c = ml_collections.ConfigDict()
    c.task = task_name  # registry name (sparseformer.data.get_task)
    c.scale = a["scale"]  # tiny (tests), small (CPU demo), paper (Long Range Arena sizes)
    c.seed = a["seed"]  # parameters, dropout, attention randomness and shuffling
    c.attention_name = a["attention"]  # preset name, or a label for tables
    c.batch_size = 32  # global batch (split over the data axis)
    c.num_train_steps = 1000  # optimizer steps
    c.log_every_steps = 50  # training metrics to log.jsonl
    c.eval_every_steps = 500  # evaluation on the validation split (0: only at the end)
    c.checkpoint_every_steps = 1000  # orbax checkpoints
    c.max_checkpoints_to_keep = 2  # older checkpoints are deleted
    c.num_eval_batches = -1  # batches per evaluation; -1: the whole split
    c.data = task.default_data_config(a["scale"])  # the task's lengths and sizes for this scale
    c.model = _model(task, a["attention"])
    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adamw"  # adamw, adafactor or sgd
    c.optimizer.learning_rate = 1e-3  # peak learning rate
    c.optimizer.warmup_steps = 100  # linear warm-up
    c.optimizer.schedule = "cosine"  # cosine, inverse_sqrt or constant (after warm-up)
    c.optimizer.weight_decay = 0.01  # decoupled weight decay (adamw)
    c.optimizer.b1 = 0.9  # first moment decay
    c.optimizer.b2 = 0.98  # second moment decay
    c.optimizer.grad_clip_norm = 1.0  # global gradient norm clip (0: off)
    c.optimizer.grad_accum_steps = 1  # micro-batches per step (batch_size must divide)
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # data-parallel axis size (-1: the devices left)
    c.mesh.model = 1  # model-parallel axis size
    c.logical_axis_rules = LOGICAL_AXIS_RULES  # parameter logical axes -> mesh axes
    c.distill = ml_collections.ConfigDict()
    c.distill.teacher_workdir = ""  # run directory of a teacher ('' = no distillation)
    c.distill.weight = 0.0  # weight of the KL to the teacher's logits
    c.distill.temperature = 1.0  # softmax temperature of the distillation KL
    for dotted, value in dict(scales.get(a["scale"], {})).items():
        _set(c, dotted, value)
    c.model.max_len = c.data.get_ref("max_len")
    if "spm_vocab_size" in c.data:  # a trained subword vocabulary: ids < spm_vocab_size
        c.model.vocab_size = c.data.get_ref("spm_vocab_size")
    if "max_target_len" in c.model:
        c.model.max_target_len = c.data.get_ref("max_target_len")
    return c


def _set(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = config
    for part in parents:
        node = node[part]
    if last not in node:
        raise ValueError(f"{dotted}: unknown key in a scale table")
    node[last] = value


# ------------------------------------------------------------------------------------ validation


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """Set flat dotted keys (a sweep entry's overrides) on `config`, in place; returns it.

    An unknown key raises `ValueError`; `validate_config` then checks the values."""
    for dotted, value in overrides.items():
        *parents, last = dotted.split(".")
        node: Any = config
        for part in parents:
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                raise ValueError(f"{dotted}: unknown key")
            node = node[part]
        if last not in node:
            raise ValueError(f"{dotted}: unknown key")
        node[last] = value
    return config


def sweeps(task_name: str, name: str, arg: str, *, scales: Mapping[str, Mapping[str, Any]], **extra: Any) -> list[dict[str, Any]]:
    """The standard sweeps of a task config: `ablation` (of rsa), `presets` (those the model
    kind can run: causal models leave out what causal attention refuses), `top_k`, plus `extra`."""
    def presets_sweep() -> list[dict[str, Any]]:
        a = parse_arg(arg)
        ok = []
        for preset in presets.names():
            try:
                validate_config(base_config(task_name, f"attention={preset},scale={a['scale']}", scales=scales))
            except ValueError:
                continue
            ok.append(preset)
        return expand.presets_sweep(ok)

    table = {
        "ablation": expand.ablation_sweep,
        "presets": presets_sweep,
        "speed": lambda: speed_sweep(task_name, parse_arg(arg)["scale"], scales=scales),
        "top_k": lambda: expand.axis("model.attention.selection.top_k", [1, 2, 4], names=["k1", "k2", "k4"]),
        **extra,
    }
    return expand.pick(name, table)


# Table 2 (LRA's speed and memory table): every preset at these lengths, a short run each.
SPEED_LENGTHS = {"tiny": (64, 128), "small": (1024, 2048, 3072, 4096), "paper": (1024, 2048, 3072, 4096)}
SPEED_RUN: dict[str, dict[str, Any]] = {  # what a timing run changes in the scale's config
    "tiny": {"num_train_steps": 4, "model.attention.selection.block_size": 16},
    # small: 8 steps (the first, with compilation, is not timed), batch 4: dense at 4K takes 10 s a
    # step and 4.3 GB (compiled) on a 2-core CPU
    "small": {"num_train_steps": 8, "batch_size": 4, "model.attention.selection.block_size": 64},
    "paper": {"num_train_steps": 50, "model.attention.selection.block_size": 64},
}


def speed_sweep(task_name: str, scale: str, *, scales: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Every preset the task can run x the scale's `SPEED_LENGTHS`: short runs for steps/s and
    memory (the trainer times from the end of the first step). Evaluation, checkpoint and data
    are cut to the minimum: the runs measure speed, not accuracy."""
    run = dict(SPEED_RUN[scale])
    steps = run["num_train_steps"]
    run.update({"log_every_steps": 1, "eval_every_steps": steps, "checkpoint_every_steps": steps, "num_eval_batches": 1})
    base = base_config(task_name, f"scale={scale}", scales=scales)
    batch = run.get("batch_size", base.batch_size)  # 64 batches of data: enough, generated fast
    run.update({f"data.{k}": v for k, v in (("num_train", 64 * batch), ("num_validation", 32), ("num_test", 32)) if k in base.data})
    entries = []
    for preset_entry in expand.presets_sweep():
        for length in SPEED_LENGTHS[scale]:
            entry = expand.merge(preset_entry, {"data.max_len": length, expand.NAME: f"L{length}"}, run)
            config = base_config(task_name, f"attention={preset_entry[expand.ARG]['attention']},scale={scale}", scales=scales)
            try:
                validate_config(apply_overrides(config, {k: v for k, v in entry.items() if k not in expand.META_KEYS}))
            except ValueError:  # e.g. causal attention refuses the preset, or a length it cannot take
                continue
            entries.append(entry)
    return entries


def _fail(key: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"{key}: {value!r} is not allowed; {allowed}")


def _choice(key: str, value: Any, allowed: tuple[str, ...] | list[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{key}: {value!r} is not one of {', '.join(allowed)}")


def _registries() -> tuple[tuple[str, ...], tuple[str, ...]]:
    try:
        from sparseformer.train import optim  # noqa: PLC0415

        return tuple(optim.OPTIMIZERS), tuple(optim.SCHEDULES)
    except ImportError:
        return OPTIMIZERS, SCHEDULES


def _type_ok(value: Any, ref: Any) -> bool:
    if isinstance(ref, bool):
        return isinstance(value, bool)
    if isinstance(ref, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(ref, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(ref, (tuple, list)):
        return isinstance(value, (tuple, list))
    return isinstance(value, type(ref))


def _check_keys(config: Any, ref: Any, prefix: str) -> None:
    """Unknown keys, missing keys and types against the reference config (attention excluded)."""
    for key in config.keys():
        full = f"{prefix}{key}"
        if key not in ref:
            raise ValueError(f"{full}: unknown key; known: {', '.join(ref.keys())}")
    for key in ref.keys():
        full = f"{prefix}{key}"
        if key not in config:
            raise ValueError(f"{full}: missing")
        if full == "model.attention":
            continue
        value, expected = config[key], ref[key]
        if isinstance(expected, ml_collections.ConfigDict):
            if not isinstance(value, (ml_collections.ConfigDict, Mapping)):
                raise _fail(full, value, "expected a config block")
            _check_keys(value, expected, full + ".")
        elif not _type_ok(value, expected):
            raise _fail(full, value, f"expected {type(expected).__name__}")


def _at_least(config: ml_collections.ConfigDict, keys: dict[str, float]) -> None:
    for dotted, low in keys.items():
        node: Any = config
        for part in dotted.split("."):
            node = node[part]
        if node < low:
            raise _fail(dotted, node, f"must be >= {low:g}")


def attention_uses(model: ml_collections.ConfigDict) -> list[tuple[str, ml_collections.ConfigDict, dict[str, Any]]]:
    """Each attention call the model makes: `(what, config, validate kwargs)`."""
    enc_len = model.max_len + (1 if model.get("pooling") == "cls" else 0)
    att = model.attention
    if model.kind in ("classifier", "dual_encoder"):
        return [("encoder self-attention", att, dict(causal=False, seq_len=enc_len, padded=True, max_len=enc_len))]
    if model.kind == "lm":
        return [("causal self-attention", att, dict(causal=True, seq_len=model.max_len, padded=False))]
    uses = [
        ("encoder self-attention", att, dict(causal=False, seq_len=model.max_len, padded=True, max_len=model.max_len)),
        ("decoder self-attention", att, dict(causal=True, seq_len=model.max_target_len, padded=False)),
    ]
    if model.cross_attention == "same":
        uses.append(("cross-attention", att, dict(causal=False, seq_len=model.max_target_len, kv_len=model.max_len,
                                                  padded=True, max_len=model.max_len)))
    return uses


# Model keys added after runs were saved without them, per model kind, with the value that
# reproduces how those runs behaved (`load_config` fills them; add a line with every new key).
LEGACY_MODEL_VALUES: dict[str, dict[str, Any]] = {
    "seq2seq": {"decode_len_ratio": 0.0, "decode_len_extra": 10},  # no output length bound
}


def upgrade_model(model: ml_collections.ConfigDict) -> list[str]:
    """Fill in place the `LEGACY_MODEL_VALUES` keys a saved `model` config lacks (its attention
    config: `attention.config.upgrade`); the dotted keys filled."""
    filled = [f"attention.{k}" for k in attention_config.upgrade(model.attention)] if "attention" in model else []
    for key, value in LEGACY_MODEL_VALUES.get(model.get("kind"), {}).items():
        if key not in model:
            with model.unlocked():
                model[key] = value
            filled.append(key)
    return filled


def _budget_fits(att: ml_collections.ConfigDict, *, causal: bool, kv_len: int) -> None:
    """A run's selection budget must leave blocks out at the run's own length. `attend` computes
    every key block when the budget holds more than there are (exact attention: how a trained model
    runs inputs shorter than its budget), but a run configured that way would train and report dense
    attention under a sparse name, so its config is refused."""
    if not attention_lib.budget_exceeds_keys(att, causal=causal, kv_len=kv_len):
        return
    sel = att.selection
    nk, available = attention_config.key_blocks_left(att, causal=causal, kv_len=kv_len)
    if sel.global_blocks > nk:
        raise _fail("model.attention.selection.global_blocks", sel.global_blocks, f"at most the {nk} key blocks there are")
    raise _fail("model.attention.selection.top_k", sel.top_k,
                f"top_k + random_blocks ({sel.top_k} + {sel.random_blocks}) must be at most {available}, the {nk} key "
                "blocks minus the window and global blocks (more computes every block: dense attention)")


def validate_config(config: ml_collections.ConfigDict, *, inference: bool = False) -> None:
    """Raise one `ValueError` naming the key, the bad value and what is allowed; else return.

    `inference=True`: the config of a trained model resized to an inference length, where a
    selection budget larger than the key blocks is allowed (those are computed exactly); a run's
    own config must leave blocks out (`_budget_fits`)."""
    from sparseformer.data import get_task, task_names  # noqa: PLC0415

    for key in ("task", "scale", "model"):
        if key not in config:
            raise ValueError(f"{key}: missing")
    _choice("task", config.task, task_names())
    _choice("scale", config.scale, SCALES)
    task = get_task(config.task)
    ref = base_config(config.task, f"scale={config.scale}", scales={})
    _check_keys(config, ref, "")

    m, opt = config.model, config.optimizer
    _choice("model.kind", m.kind, [task.kind])
    _choice("model.positions", m.positions, POSITIONS)
    _choice("model.dtype", m.dtype, DTYPES)
    _choice("model.param_dtype", m.param_dtype, PARAM_DTYPES)
    optimizers, schedules = _registries()
    _choice("optimizer.name", opt.name, optimizers)
    _choice("optimizer.schedule", opt.schedule, schedules)
    if "pooling" in m:
        _choice("model.pooling", m.pooling, POOLINGS)
    _at_least(config, {
        "batch_size": 1, "num_train_steps": 1, "log_every_steps": 1, "eval_every_steps": 0,
        "checkpoint_every_steps": 1, "max_checkpoints_to_keep": 1, "mesh.model": 1,
        "model.vocab_size": 1, "model.max_len": 1, "model.num_layers": 1, "model.num_heads": 1,
        "model.num_kv_heads": 1, "model.emb_dim": 1, "model.mlp_dim": 1, "model.dropout_rate": 0.0,
        "model.label_smoothing": 0.0, "optimizer.learning_rate": 0.0, "optimizer.warmup_steps": 0,
        "optimizer.weight_decay": 0.0, "optimizer.grad_clip_norm": 0.0, "optimizer.grad_accum_steps": 1,
        "distill.weight": 0.0, "distill.temperature": 1e-6,
    })
    for key in ("model.dropout_rate", "model.label_smoothing", "optimizer.b1", "optimizer.b2"):
        section, name = key.split(".")
        if not 0.0 <= config[section][name] < 1.0:
            raise _fail(key, config[section][name], "must be in [0, 1)")
    if config.num_eval_batches < 1 and config.num_eval_batches != -1:
        raise _fail("num_eval_batches", config.num_eval_batches, "must be >= 1, or -1 for the whole split")
    if config.mesh.data < 1 and config.mesh.data != -1:
        raise _fail("mesh.data", config.mesh.data, "must be >= 1, or -1 for the devices left")
    if config.batch_size % opt.grad_accum_steps:
        raise _fail("optimizer.grad_accum_steps", opt.grad_accum_steps, f"must divide batch_size={config.batch_size}")
    for rule in config.logical_axis_rules:
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
            raise _fail("logical_axis_rules", rule, "each rule is a pair (logical name, mesh axis or None)")
    if config.distill.weight > 0 and not config.distill.teacher_workdir:
        raise _fail("distill.weight", config.distill.weight, "needs distill.teacher_workdir")

    task.check_data_config(config.data)
    vocab = task.data_vocab_size(config.data)  # None: known once the run's data is resolved (file tasks)
    if vocab is not None and m.vocab_size < vocab:
        raise _fail("model.vocab_size", m.vocab_size, f"the task {config.task!r} has {vocab} tokens")
    classes = task.data_num_classes(config.data)
    if m.kind in ("classifier", "dual_encoder") and classes is not None and m.num_classes != classes:
        raise _fail("model.num_classes", m.num_classes, f"the task {config.task!r} has {classes} classes")
    if m.max_len != config.data.max_len:
        raise _fail("model.max_len", m.max_len, f"must equal data.max_len={config.data.max_len}")
    if m.emb_dim % m.num_heads:
        raise _fail("model.num_heads", m.num_heads, f"must divide model.emb_dim={m.emb_dim}")
    if m.num_heads % m.num_kv_heads:
        raise _fail("model.num_kv_heads", m.num_kv_heads, f"must divide model.num_heads={m.num_heads}")
    if m.positions == "sinusoidal" and m.emb_dim % 2:
        raise _fail("model.emb_dim", m.emb_dim, "must be even for sinusoidal positions")
    if m.kind == "seq2seq":
        _choice("model.cross_attention", m.cross_attention, CROSS_ATTENTION)
        _at_least(config, {"model.num_decoder_layers": 1, "model.beam_size": 1, "model.length_penalty": 0.0,
                           "model.max_target_len": 1, "model.decode_len_ratio": 0.0, "model.decode_len_extra": 1})
        if m.max_target_len != config.data.max_target_len:
            raise _fail("model.max_target_len", m.max_target_len, f"must equal data.max_target_len={config.data.max_target_len}")

    for what, att, kwargs in attention_uses(m):
        try:
            attention_lib.validate(att, **kwargs)
            if not inference:
                _budget_fits(att, causal=kwargs["causal"], kv_len=kwargs.get("kv_len", kwargs["seq_len"]))
        except ValueError as e:
            length = kwargs["seq_len"] if "kv_len" not in kwargs else f"{kwargs['seq_len']} x {kwargs['kv_len']}"
            raise ValueError(f"{e} (in the {what}, length {length}, attention {config.attention_name!r})") from None
