"""The attention benchmark: speed, memory, FLOPs and fidelity of presets against dense attention.

Modules:
  inputs   the two input kinds for fidelity (random peaky attention, planted needles)
  methods  the registry of what can be benchmarked: the dense baseline and every attention preset
  measure  compiling, compiled memory, interleaved timing, and the fresh-process peak-memory probe
  report   bench.json, bench.md (ratios to dense from the same run) and bench.png
  cli      `sparseformer bench`
"""
