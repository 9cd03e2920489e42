"""The one sharded training loop: mesh, sharded state, jitted step, orbax checkpoints, metrics.

    from sparseformer.train import train_and_evaluate
    metrics = train_and_evaluate(config, workdir)

Modules: `sharding` (mesh and logical-axis rules), `state` (train state created sharded),
`optim` (optimizers and schedules by name), `step` (the pure train and eval steps),
`checkpoint` (orbax), `metrics_io` (log.jsonl, TensorBoard, progress, metrics.json),
`loop` (`train_and_evaluate`, `evaluate_workdir`), `cli` (`sparseformer train` / `eval`).
"""

from sparseformer.train.loop import Components, train_and_evaluate

__all__ = ["Components", "train_and_evaluate"]
