"""Table 3: the component ablation of `rsa` (dense; selection only; compression only; the naive
sum; with correction but no regulariser; full rsa; rsa with each selection estimator).

    python experiments/table3_ablation.py --scale=small [--tasks=listops,retrieval] [--parallel=2]

Runs the `ablation` sweep of each task config over seeds into runs/table3_<scale>/<task>/, then
writes experiments/results/<scale>/table3.md (task metric, fidelity, steps/s and memory relative
to dense) and table3.png (task metric against speed, Pareto front drawn).
"""

import sys

from sparseformer.sweep.experiment import Experiment, main

EXPERIMENT = Experiment(number="3", sweep="ablation", tasks=("listops", "retrieval"),
                        description="Table 3: the component ablation, with fidelity, speed and memory.")

if __name__ == "__main__":
    sys.exit(main(EXPERIMENT))
