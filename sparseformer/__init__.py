"""sparseformer: select, compress and correct attention, in JAX and Flax NNX.

Subpackages:
  attention  the attention core: pure functions, registries and presets
  data       tasks (built-in generators and TFDS catalog datasets) read with grain
  models     Flax NNX models built on the attention core
  train      the one sharded training loop
  sweep      ablation sweeps and paper tables
  bench      the attention benchmark
"""

__version__ = "0.1.0"
