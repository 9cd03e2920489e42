"""Table 1: the task metric of every attention preset on every task (Long Range Arena Table 1).

    python experiments/table1_tasks.py --scale=small [--tasks=listops,retrieval] [--parallel=2]

Runs the `presets` sweep of each task config (configs/<task>.py) over seeds into
runs/table1_<scale>/<task>/, then writes experiments/results/<scale>/table1.md and table1.png.
Re-running skips finished runs and resumes interrupted ones. `--dry_run` lists the runs.
"""

import sys

from sparseformer.sweep.experiment import Experiment, main

EXPERIMENT = Experiment(number="1", sweep="presets", tasks=(),
                        description="Table 1: task metric per task and attention preset.")

if __name__ == "__main__":
    sys.exit(main(EXPERIMENT))
