"""Sweeps and paper tables.

  expand  sweeps as lists of override dicts: combinators, the standard ablation, named runs
  launch  one process per run (local, N at a time, or a submitit/Slurm job array), skip/resume/fail
  table   metrics.json -> mean ± std over seeds, three layouts, md/latex/csv
  plot    task metric against speed with the Pareto front (PNG)
  report  table + plot from a workdir (what `sparseformer table` and experiments/ call)
  cli     `sparseformer sweep` and `sparseformer table`
"""
