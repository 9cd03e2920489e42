"""Run the trainer on the toy task in a fresh process (for the kill/resume and multi-process tests).

    python tests/train/toy_main.py WORKDIR '{"num_train_steps": 12}' [COORDINATOR NUM_PROCESSES PROCESS_ID]
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv: list[str]) -> int:
    workdir, overrides = argv[0], json.loads(argv[1])
    from sparseformer.train.cli import initialize_distributed

    if len(argv) > 2:
        initialize_distributed(argv[2], int(argv[3]), int(argv[4]))
    import toy

    from sparseformer.train import train_and_evaluate

    try:
        train_and_evaluate(toy.toy_config(**overrides), workdir, components=toy.COMPONENTS)
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
