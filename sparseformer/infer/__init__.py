"""Inference of trained models: batched prediction, export, and their speed.

Modules:
  model    the inference programs of each model kind (pure functions of parameters and arrays),
           random or trained parameters
  speed    `measure_model`: latency, throughput and memory of a model at a length
"""
