"""Tables from the metrics of finished runs: mean ± std over seeds, best entry marked.

Reading: `load_records(workdir)` finds every `metrics.json` below a directory and pairs it with
the `run.json` beside it (its `label` is the table row; without one, metrics' `attention`).
`load_bench(path)` reads the `bench.json` of `sparseformer bench`.

Aggregating (pure functions): `aggregate` gives the mean, the *sample* standard deviation
(ddof=1; undefined for one seed) and the number of seeds. Speed and memory relative to dense
divide each run's value by the mean of the reference (`dense`) runs of the same task and
length, then aggregate those ratios over seeds.

The three layouts (`LAYOUTS`), after the Long Range Arena paper:
1. `tasks`: the task metric per task (columns) per preset (rows), with the average over the
   accuracy columns;
2. `speed`: training steps/s and peak memory relative to dense, per sequence length;
3. `ablation`: one row per configuration; task metric, fidelity, steps/s and memory relative
   to dense, per task.

Formats (`FORMATTERS`): `md`, `latex` (booktabs), `csv`. The best entry of each column is
bold (`*` after it in csv), by the column's direction: higher accuracy, BLEU and speed;
lower perplexity, fidelity (a KL divergence) and memory.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from sparseformer.sweep.expand import DEFAULT_PRESETS

HIGHER, LOWER, NEUTRAL = 1, -1, 0
MAIN_METRICS: dict[str, int] = {"accuracy": HIGHER, "bleu": HIGHER, "perplexity": LOWER}
"""Task metrics, in the order they are looked for in a metrics.json, with their direction."""
BENCH_TRAIN_PASSES = ("fwd+bwd", "forward+backward", "fwd_bwd", "forward_backward", "train")
"""Benchmark passes that stand for a training step, the first found being used."""


# --------------------------------------------------------------------------- reading


@dataclasses.dataclass(frozen=True)
class Record:
    """One finished run."""

    task: str
    label: str
    seed: int
    max_len: int | None
    metrics: Mapping[str, Any]
    order: int = 1 << 30    # position of its entry in the sweep (orders the rows)
    sweep: str = ""
    path: str = ""

    def value(self, key: str) -> float | None:
        v = self.metrics.get(key)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    @property
    def main_metric(self) -> str | None:
        return next((m for m in MAIN_METRICS if self.value(m) is not None), None)


def load_records(workdirs: str | Path | Iterable[str | Path]) -> list[Record]:
    """Every finished run below `workdirs` (a `metrics.json`, with the `run.json` beside it)."""
    roots = [workdirs] if isinstance(workdirs, (str, Path)) else list(workdirs)
    records = []
    for root in roots:
        for path in sorted(Path(root).rglob("metrics.json")):
            metrics = json.loads(path.read_text())
            run_path = path.parent / "run.json"
            run = json.loads(run_path.read_text()) if run_path.is_file() else {}
            max_len = metrics.get("max_len")
            records.append(Record(
                task=str(metrics.get("task", "task")),
                label=str(run.get("label") or metrics.get("attention") or path.parent.name),
                seed=int(run.get("seed", metrics.get("seed", 0))),
                max_len=int(max_len) if max_len is not None else None,
                metrics=metrics,
                order=int(run.get("index", 1 << 30)),
                sweep=str(run.get("sweep", "")),
                path=str(path.parent)))
    return records


def find_bench_files(workdirs: str | Path | Iterable[str | Path]) -> list[Path]:
    roots = [workdirs] if isinstance(workdirs, (str, Path)) else list(workdirs)
    return [p for root in roots for p in sorted(Path(root).rglob("bench.json"))]


def load_bench(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """The `results` of benchmark files (`{"results": [{"preset", "length", "pass",
    "median_ms", "compiled_bytes", ...}]}`), concatenated."""
    return [r for p in paths for r in json.loads(Path(p).read_text()).get("results", [])]


# --------------------------------------------------------------------------- aggregating


@dataclasses.dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (ddof=1, NaN for one value) of `n` seeds.
    `n = 0` marks a derived number (e.g. an average over tasks) rather than a seed mean."""

    mean: float
    std: float
    n: int


def aggregate(values: Iterable[float]) -> Stat:
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("aggregate: no values")
    std = statistics.stdev(vals) if len(vals) > 1 else math.nan
    return Stat(statistics.fmean(vals), std, len(vals))


def reference_means(records: Sequence[Record], key: str, reference: str) -> dict[tuple[str, int | None], float]:
    """Mean of `key` over the reference runs, per (task, max_len)."""
    groups: dict[tuple[str, int | None], list[float]] = defaultdict(list)
    for r in records:
        if r.label == reference and (v := r.value(key)) is not None:
            groups[(r.task, r.max_len)].append(v)
    return {k: statistics.fmean(v) for k, v in groups.items()}


def relative_values(records: Sequence[Record], key: str, reference: str) -> dict[int, float]:
    """`key` of each record (by position) divided by the reference mean at its task and length;
    records without a reference or a value are left out."""
    ref = reference_means(records, key, reference)
    out = {}
    for i, r in enumerate(records):
        base = ref.get((r.task, r.max_len))
        if (v := r.value(key)) is not None and base:
            out[i] = v / base
    return out


def group_stats(records: Sequence[Record], key_fn: Callable[[Record], Any],
                value_fn: Callable[[int, Record], float | None]) -> dict[Any, Stat]:
    """Aggregate `value_fn(i, record)` over the records of each `key_fn(record)` group."""
    groups: dict[Any, list[float]] = defaultdict(list)
    for i, r in enumerate(records):
        if (v := value_fn(i, r)) is not None:
            groups[key_fn(r)].append(v)
    return {k: aggregate(v) for k, v in groups.items()}


# --------------------------------------------------------------------------- the table model


@dataclasses.dataclass(frozen=True)
class Column:
    name: str
    group: str = ""          # a header spanning several columns (a task, a quantity)
    better: int = NEUTRAL    # HIGHER, LOWER or NEUTRAL: which entry is marked best
    scale: float = 1.0       # shown value = stored value * scale (accuracy as a percentage)
    precision: int = 2
    trivial_for_reference: bool = False  # the reference row is not a contender (its ratio is 1, its KL 0)

    @property
    def key(self) -> str:
        return f"{self.group}/{self.name}"

    @property
    def title(self) -> str:
        return f"{self.group} {self.name}".strip()


@dataclasses.dataclass(frozen=True)
class Table:
    title: str
    row_header: str
    rows: tuple[str, ...]
    columns: tuple[Column, ...]
    cells: Mapping[tuple[str, str], Stat]   # (row, column key) -> Stat
    notes: tuple[str, ...] = ()
    reference: str = "dense"                 # the row relative columns divide by

    def cell(self, row: str, column: Column) -> Stat | None:
        return self.cells.get((row, column.key))


def best_rows(table: Table) -> dict[str, set[str]]:
    """Per column key, the rows holding its best mean (ties all marked; none when the column
    is neutral or has fewer than two entries). In columns relative to the reference row (or
    where it is trivially best, as the KL of dense attention to itself), the reference row does
    not compete."""
    best: dict[str, set[str]] = {}
    for col in table.columns:
        present = {r: s.mean for r in table.rows if (s := table.cell(r, col)) is not None
                   and not math.isnan(s.mean)}
        vals = {r: v for r, v in present.items()
                if not (col.trivial_for_reference and r.rsplit(": ", 1)[-1] == table.reference)}
        if col.better == NEUTRAL or len(present) < 2 or not vals:
            continue
        target = max(vals.values()) if col.better == HIGHER else min(vals.values())
        best[col.key] = {r for r, v in vals.items() if math.isclose(v, target, rel_tol=1e-12)}
    return best


def common_n(table: Table) -> int | None:
    """The number of seeds most cells have (cells with another count show theirs)."""
    counts = Counter(s.n for s in table.cells.values() if s.n > 0)
    return counts.most_common(1)[0][0] if counts else None


def select(table: Table, rows: Sequence[str] | None = None, cols: Sequence[str] | None = None) -> Table:
    """Keep the given rows (in that order) and the columns whose name, group or key is listed.
    Unknown names raise a `ValueError` listing the known ones."""
    new_rows = table.rows
    if rows:
        unknown = [r for r in rows if r not in table.rows]
        if unknown:
            raise ValueError(f"unknown rows {unknown}; known rows: {list(table.rows)}")
        new_rows = tuple(rows)
    new_cols = table.columns
    if cols:
        wanted = set(cols)
        new_cols = tuple(c for c in table.columns if wanted & {c.name, c.group, c.key, c.title})
        known = sorted({c.name for c in table.columns} | {c.group for c in table.columns if c.group})
        unknown = [c for c in cols if not any(c in {x.name, x.group, x.key, x.title} for x in table.columns)]
        if unknown:
            raise ValueError(f"unknown columns {unknown}; known columns and groups: {known}")
    return dataclasses.replace(table, rows=new_rows, columns=new_cols)


# --------------------------------------------------------------------------- layouts


def _row_order(records: Sequence[Record], labels: Iterable[str]) -> tuple[str, ...]:
    """Rows in sweep order (the entry index in run.json), then the preset order of DESIGN.md,
    then alphabetically."""
    first: dict[str, int] = {}
    for r in records:
        first[r.label] = min(first.get(r.label, r.order), r.order)
    preset_pos = {p: i for i, p in enumerate(DEFAULT_PRESETS)}
    return tuple(sorted(set(labels), key=lambda l: (first.get(l, 1 << 30), preset_pos.get(l, 1 << 20), l)))


def _metric_column(metric: str, values: Iterable[float], group: str = "", name: str | None = None) -> Column:
    """A task-metric column; accuracies stored as fractions are shown as percentages."""
    if metric == "accuracy" and all(v <= 1.0 for v in values):
        return Column(name or "accuracy (%)", group, HIGHER, scale=100.0)
    return Column(name or metric, group, MAIN_METRICS.get(metric, NEUTRAL))


def _length_name(length: int | None) -> str:
    if length is None:
        return "?"
    return f"{length // 1024}K" if length % 1024 == 0 else str(length)


def _stat_note(extra: str = "") -> str:
    return ("mean ± sample std (ddof=1) over seeds; best of each column in bold"
            + (f"; {extra}" if extra else ""))


def table_tasks(records: Sequence[Record], reference: str = "dense") -> Table:
    """Layout 1: the task metric (columns: tasks) per configuration (rows), and `Avg`, the mean
    over the accuracy columns of the per-task means (for rows that have all of them)."""
    del reference
    by_task: dict[str, str] = {}
    for r in records:
        if (m := r.main_metric) is not None:
            by_task.setdefault(r.task, m)
    tasks = sorted(by_task)
    if not tasks:
        raise ValueError("no run has a task metric (accuracy, bleu or perplexity)")
    stats = group_stats(records, lambda r: (r.label, r.task), lambda i, r: r.value(by_task.get(r.task, "")))
    columns = [_metric_column(by_task[t], [r.value(by_task[t]) or 0 for r in records if r.task == t],
                              name=t) for t in tasks]
    rows = _row_order(records, {label for label, _ in stats})
    col_of = dict(zip(tasks, columns))
    cells = {(label, col_of[task].key): s for (label, task), s in stats.items() if task in col_of}
    acc_cols = [c for c, t in zip(columns, tasks) if by_task[t] == "accuracy"]
    notes = [_stat_note(f"columns: {', '.join(f'{t} ({by_task[t]})' for t in tasks)}")]
    if acc_cols:
        avg = Column("Avg", "", HIGHER, scale=acc_cols[0].scale)
        for row in rows:
            means = [cells[(row, c.key)].mean * c.scale / avg.scale for c in acc_cols if (row, c.key) in cells]
            if len(means) == len(acc_cols):
                cells[(row, avg.key)] = Stat(statistics.fmean(means), math.nan, 0)
        columns.append(avg)
        notes.append(f"Avg: mean of the {len(acc_cols)} accuracy columns")
    return Table("Task metric per task and attention", "attention", rows, tuple(columns), cells, tuple(notes))


def _speed_memory_table(keyed: Sequence[tuple[str, int, float, float | None]], reference: str,
                        title: str, speed_name: str, notes: Sequence[str]) -> Table:
    """Layout 2 from (row, length, speed, memory) tuples: ratios to the reference row
    at the same length, aggregated per (row, length)."""
    ref_speed: dict[int, list[float]] = defaultdict(list)
    ref_mem: dict[int, list[float]] = defaultdict(list)
    for row, length, speed, mem in keyed:
        if row == reference:
            ref_speed[length].append(speed)
            if mem is not None:
                ref_mem[length].append(mem)
    if not ref_speed:
        raise ValueError(f"no {reference!r} runs to compare with: layout 2 is relative to "
                         f"{reference!r} (change it with --reference)")
    lengths = sorted({k[1] for k in keyed})
    speed_cols = [Column(_length_name(L), speed_name, HIGHER, trivial_for_reference=True) for L in lengths]
    mem_cols = [Column(_length_name(L), f"peak memory (× {reference})", LOWER, trivial_for_reference=True)
                for L in lengths]
    speed_ratios: dict[tuple[str, str], list[float]] = defaultdict(list)
    mem_ratios: dict[tuple[str, str], list[float]] = defaultdict(list)
    for row, length, speed, mem in keyed:
        i = lengths.index(length)
        if ref_speed.get(length):
            speed_ratios[(row, speed_cols[i].key)].append(speed / statistics.fmean(ref_speed[length]))
        if mem is not None and ref_mem.get(length):
            mem_ratios[(row, mem_cols[i].key)].append(mem / statistics.fmean(ref_mem[length]))
    cells = {k: aggregate(v) for k, v in {**speed_ratios, **mem_ratios}.items()}
    ref_notes = [f"{reference} at {_length_name(L)}: {statistics.fmean(ref_speed[L]):.3g} /s"
                 + (f", {statistics.fmean(ref_mem[L]) / 2**20:.4g} MiB" if ref_mem.get(L) else "")
                 for L in lengths if ref_speed.get(L)]
    return Table(title, "attention", tuple(dict.fromkeys(k[0] for k in keyed)),
                 tuple(speed_cols + mem_cols), cells, (*notes, "; ".join(ref_notes)), reference)


def table_speed(records: Sequence[Record], reference: str = "dense") -> Table:
    """Layout 2 from training runs: steps/s and peak memory relative to `reference`, per
    sequence length (`max_len`). With several tasks, rows are `task: label`."""
    usable = [r for r in records if r.max_len is not None and r.value("steps_per_second")]
    if not usable:
        raise ValueError("no run has both max_len and steps_per_second")
    tasks = sorted({r.task for r in usable})
    if len(tasks) > 1:  # one block of rows per task, each relative to its own dense runs
        tables = [table_speed([r for r in usable if r.task == t], reference) for t in tasks]
        return _concat_rows(tables, [f"{t}: " for t in tasks])
    ordered = _row_order(usable, {r.label for r in usable})
    usable = sorted(usable, key=lambda r: ordered.index(r.label))
    keyed = [(r.label, r.max_len, r.value("steps_per_second"), r.value("peak_memory_bytes"))
             for r in usable]
    return _speed_memory_table(keyed, reference, f"Training speed and peak memory relative to {reference}",
                               f"steps/s (× {reference})",
                               [_stat_note(f"ratios to the {reference} mean, per seed")])


def _concat_rows(tables: Sequence[Table], prefixes: Sequence[str]) -> Table:
    columns: dict[str, Column] = {}
    rows: list[str] = []
    cells: dict[tuple[str, str], Stat] = {}
    for t, p in zip(tables, prefixes):
        columns.update({c.key: c for c in t.columns})
        rows += [p + r for r in t.rows]
        cells.update({(p + r, k): s for (r, k), s in t.cells.items()})
    notes = tuple(dict.fromkeys(n for t in tables for n in t.notes))
    return Table(tables[0].title, tables[0].row_header, tuple(rows), tuple(columns.values()), cells, notes,
                 tables[0].reference)


def table_speed_bench(results: Sequence[Mapping[str, Any]], reference: str = "dense",
                      pass_name: str | None = None) -> Table:
    """Layout 2 from an attention benchmark: speed = 1 / median time of the pass that stands
    for a training step (`BENCH_TRAIN_PASSES`, or `pass_name`), memory = XLA's compiled bytes."""
    passes = list(dict.fromkeys(str(r.get("pass", "")) for r in results))
    chosen = pass_name or next((p for p in BENCH_TRAIN_PASSES if p in passes), passes[0] if passes else "")
    rows = [r for r in results if str(r.get("pass", "")) == chosen and r.get("median_ms")]
    if not rows:
        raise ValueError(f"benchmark has no results for pass {chosen!r}; passes: {passes}")
    preset_pos = {p: i for i, p in enumerate(DEFAULT_PRESETS)}
    rows.sort(key=lambda r: (preset_pos.get(r["preset"], 1 << 20), r["preset"], r["length"]))
    keyed = [(str(r["preset"]), int(r["length"]), 1000.0 / float(r["median_ms"]),
              float(r["compiled_bytes"]) if r.get("compiled_bytes") else None) for r in rows]
    return _speed_memory_table(
        keyed, reference, f"Attention speed and memory relative to {reference} (benchmark)",
        f"speed (× {reference})",
        [f"from bench.json, pass {chosen!r}: speed = 1 / median time, memory = XLA compiled bytes; "
         "mean ± sample std over benchmark entries"])


def table_ablation(records: Sequence[Record], reference: str = "dense") -> Table:
    """Layout 3: per configuration, per task: task metric, fidelity, steps/s and peak memory
    relative to `reference`."""
    tasks = sorted({r.task for r in records})
    speed = relative_values(records, "steps_per_second", reference)
    memory = relative_values(records, "peak_memory_bytes", reference)
    columns: list[Column] = []
    cells: dict[tuple[str, str], Stat] = {}
    for task in tasks:
        mine = [(i, r) for i, r in enumerate(records) if r.task == task]
        metric = next((r.main_metric for _, r in mine if r.main_metric), None)
        specs: list[tuple[Column, Callable[[int, Record], float | None]]] = []
        if metric:
            col = _metric_column(metric, [r.value(metric) or 0 for _, r in mine], group=task,
                                 name="accuracy (%)" if metric == "accuracy" else metric)
            specs.append((col, lambda i, r, m=metric: r.value(m)))
        specs += [(Column("fidelity (KL)", task, LOWER, precision=3, trivial_for_reference=True),
                   lambda i, r: r.value("fidelity")),
                  (Column(f"steps/s (× {reference})", task, HIGHER, trivial_for_reference=True),
                   lambda i, r: speed.get(i)),
                  (Column(f"memory (× {reference})", task, LOWER, trivial_for_reference=True),
                   lambda i, r: memory.get(i))]
        for col, fn in specs:
            columns.append(col)
            stats = group_stats(records, lambda r: (r.task, r.label),
                                lambda i, r, fn=fn, t=task: fn(i, r) if r.task == t else None)
            cells.update({(label, col.key): s for (_, label), s in stats.items()})
    rows = _row_order(records, {r.label for r in records})
    return Table("Component ablation", "configuration", rows, tuple(columns), cells,
                 (_stat_note(f"speed and memory: ratio to the {reference} mean of the same task"),), reference)


LAYOUTS: dict[str, Callable[[Sequence[Record], str], Table]] = {
    "1": table_tasks,
    "2": table_speed,
    "3": table_ablation,
}


def auto_layout(records: Sequence[Record], bench: Sequence[Mapping[str, Any]] = ()) -> str:
    """3 for an ablation sweep, 2 for runs at several lengths of one task (or only a benchmark),
    else 1."""
    if any(r.sweep == "ablation" for r in records):
        return "3"
    lengths = defaultdict(set)
    for r in records:
        lengths[r.task].add(r.max_len)
    if (bench and not records) or any(len(v) > 1 for v in lengths.values()):
        return "2"
    return "1"


def build_table(layout: str, records: Sequence[Record], *, bench: Sequence[Mapping[str, Any]] = (),
                reference: str = "dense") -> Table:
    """The table of `layout` (`1`, `2`, `3` or `auto`); layout 2 comes from the benchmark when
    there are no training runs at several lengths but a benchmark is given."""
    layout = auto_layout(records, bench) if layout == "auto" else layout
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known layouts: {', '.join(LAYOUTS)}, auto")
    if layout == "2" and bench and not any(r.max_len and r.value("steps_per_second") for r in records):
        return table_speed_bench(bench, reference)
    if not records:
        raise ValueError("no finished runs (no metrics.json) found")
    return LAYOUTS[layout](records, reference)


# --------------------------------------------------------------------------- formatting


def _number(x: float, col: Column) -> str:
    return f"{x * col.scale:.{col.precision}f}"


def cell_text(stat: Stat | None, col: Column, n: int | None, *, pm: str = " ± ", missing: str = "—") -> str:
    """`61.20 ± 0.30`, with ` (n=2)` when the seed count differs from the table's usual `n`."""
    if stat is None:
        return missing
    text = _number(stat.mean, col)
    if not math.isnan(stat.std):
        text += pm + _number(stat.std, col)
    if stat.n > 0 and n is not None and stat.n != n:
        text += f" (n={stat.n})"
    return text


def _seed_note(table: Table) -> str:
    n = common_n(table)
    return f"n = {n} seeds per entry unless marked" if n else ""


def format_markdown(table: Table) -> str:
    n, best = common_n(table), best_rows(table)
    header = [table.row_header, *(c.title for c in table.columns)]
    lines = [f"**{table.title}**", "", "| " + " | ".join(header) + " |",
             "| --- |" + " ---: |" * len(table.columns)]
    for row in table.rows:
        cells = []
        for c in table.columns:
            text = cell_text(table.cell(row, c), c, n)
            cells.append(f"**{text}**" if row in best.get(c.key, ()) else text)
        lines.append("| " + " | ".join([row, *cells]) + " |")
    notes = [x for x in (*table.notes, _seed_note(table)) if x]
    return "\n".join(lines + [""] + [f"_{x}_" for x in notes]) + "\n"


_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}",
                  "±": r"$\pm$", "×": r"$\times$"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in text)


def format_latex(table: Table) -> str:
    n, best = common_n(table), best_rows(table)
    cols = table.columns
    out = [r"\begin{table}[t]", r"\centering",
           r"\caption{" + latex_escape(" ".join([table.title + ".", *table.notes, _seed_note(table)])) + "}",
           r"\begin{tabular}{l" + "c" * len(cols) + "}", r"\toprule"]
    if any(c.group for c in cols):  # a spanning header per group of adjacent columns
        spans: list[tuple[str, int]] = []
        for c in cols:
            if spans and spans[-1][0] == c.group:
                spans[-1] = (c.group, spans[-1][1] + 1)
            else:
                spans.append((c.group, 1))
        heads, rules, start = [""], [], 2
        for group, width in spans:
            heads.append(rf"\multicolumn{{{width}}}{{c}}{{{latex_escape(group)}}}" if group else "")
            if group:
                rules.append(rf"\cmidrule(lr){{{start}-{start + width - 1}}}")
            start += width
        out += [" & ".join(heads) + r" \\", " ".join(rules)]
    out.append(" & ".join([latex_escape(table.row_header), *(latex_escape(c.name) for c in cols)]) + r" \\")
    out.append(r"\midrule")
    for row in table.rows:
        cells = []
        for c in cols:
            text = cell_text(table.cell(row, c), c, n, pm=r" $\pm$ ", missing="--")
            cells.append(rf"\textbf{{{text}}}" if row in best.get(c.key, ()) else text)
        out.append(" & ".join([latex_escape(row), *cells]) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(out) + "\n"


def format_csv(table: Table) -> str:
    n, best = common_n(table), best_rows(table)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([table.row_header, *(c.title for c in table.columns)])
    for row in table.rows:
        writer.writerow([row, *(cell_text(table.cell(row, c), c, n, pm=" ± ", missing="")
                                + ("*" if row in best.get(c.key, ()) else "") for c in table.columns)])
    return buf.getvalue()


FORMATTERS: dict[str, Callable[[Table], str]] = {"md": format_markdown, "latex": format_latex, "csv": format_csv}
EXTENSIONS: dict[str, str] = {"md": "md", "latex": "tex", "csv": "csv"}


def render(table: Table, fmt: str) -> str:
    if fmt not in FORMATTERS:
        raise ValueError(f"unknown format {fmt!r}; known formats: {', '.join(FORMATTERS)}")
    return FORMATTERS[fmt](table)
