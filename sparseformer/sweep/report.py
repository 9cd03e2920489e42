"""Tables and plot from a workdir, as the `table` command and the experiment scripts write them."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path

from sparseformer.sweep import table as tbl
from sparseformer.sweep.plot import plot_tradeoff


@dataclasses.dataclass(frozen=True)
class Report:
    text: str                 # the table in the chosen format
    layout: str               # the layout used ("1", "2" or "3")
    table_path: Path | None   # where it was written (with `out`)
    plot_path: Path | None


def make_report(workdirs: str | Path | Iterable[str | Path], *, layout: str = "auto", fmt: str = "md",
                rows: Sequence[str] | None = None, cols: Sequence[str] | None = None,
                bench: Sequence[str | Path] | None = None, reference: str = "dense",
                out: str | Path | None = None, plot: bool = True) -> Report:
    """Read the runs (and benchmark files: `bench`, else any `bench.json` below the workdirs),
    build the table of `layout`, render it as `fmt`; with `out`, write `table<N>.<ext>` there
    and, when `plot` and there are runs, `table<N>.png` beside it."""
    roots = [workdirs] if isinstance(workdirs, (str, Path)) else list(workdirs)
    for root in roots:
        if not Path(root).is_dir():
            raise FileNotFoundError(f"workdir {str(root)!r} does not exist")
    records = tbl.load_records(roots)
    bench_results = tbl.load_bench(bench if bench else tbl.find_bench_files(roots))
    layout = tbl.auto_layout(records, bench_results) if layout == "auto" else layout
    table = tbl.select(tbl.build_table(layout, records, bench=bench_results, reference=reference), rows, cols)
    text = tbl.render(table, fmt)
    table_path = plot_path = None
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        table_path = out / f"table{layout}.{tbl.EXTENSIONS[fmt]}"
        table_path.write_text(text)
        if plot and records:
            kept = set(table.rows)
            shown = [r for r in records if r.label in kept] or records
            plot_path = plot_tradeoff(shown, out / f"table{layout}.png", reference=reference,
                                      title=table.title)
    return Report(text, layout, table_path, plot_path)
