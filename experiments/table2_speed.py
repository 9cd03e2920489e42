"""Table 2: training steps/s and peak memory relative to dense at lengths 1K-4K
(Long Range Arena Table 2).

    python experiments/table2_speed.py --scale=small [--tasks=text]
    python experiments/table2_speed.py --scale=small --bench=bench/bench.json   # from `sparseformer bench`

Runs the `speed` sweep of the task config (presets x sequence lengths, defined by the config
for its scale) into runs/table2_<scale>/<task>/, then writes experiments/results/<scale>/table2.md
and table2.png. With `--bench`, the table is built from an attention benchmark instead
(speed = 1 / median forward+backward time, memory = XLA's compiled bytes) and nothing is trained.
"""

import sys

from sparseformer.sweep.experiment import Experiment, main

EXPERIMENT = Experiment(number="2", sweep="speed", tasks=("listops",),
                        description="Table 2: training speed and peak memory relative to dense, per length.")

if __name__ == "__main__":
    sys.exit(main(EXPERIMENT))
