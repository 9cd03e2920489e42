"""`sparseformer presets`: list the presets and what each switches on."""

from __future__ import annotations

import argparse

from sparseformer.attention import presets


def presets_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="sparseformer presets",
        description="List the attention presets: the classic methods expressed as selection, "
        "compression and correction. Use one with --config=configs/TASK.py:attention=NAME.",
    )
    parser.parse_args(argv)
    rows = [("preset", "selection", "compression", "correction")]
    for name in presets.names():
        c = presets.components(presets.get(name))
        rows.append((name, c["selection"], c["compression"], c["correction"]))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print()
    for name in presets.names():
        print(f"{name:>12}: {presets.describe(name)}")
    return 0
