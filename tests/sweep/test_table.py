"""Tables: numbers against hand-computed means and sample deviations on planted metrics
files, best-entry marking with its direction, the three layouts in the three formats, the plot."""

import csv
import io
import json
import math
import re

import pytest

from planted import plant, plant_ablation, plant_speed, plant_tasks
from sparseformer.sweep import cli, table
from sparseformer.sweep.plot import pareto_front, tradeoff_points
from sparseformer.sweep.report import make_report

PLANTERS = {"1": plant_tasks, "2": plant_speed, "3": plant_ablation}


def _rows(text: str) -> dict[str, list[str]]:
    """Markdown table rows by their first cell."""
    out = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| ---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            out[cells[0]] = cells[1:]
    return out


def test_aggregate_is_mean_and_sample_std():
    s = table.aggregate([0.3, 0.4, 0.5])
    assert (s.mean, s.n) == (pytest.approx(0.4), 3)
    assert s.std == pytest.approx(0.1)  # ddof=1: population std would be 0.0816
    one = table.aggregate([2.0])
    assert one.mean == 2.0 and math.isnan(one.std) and one.n == 1


def test_layout1_numbers_average_and_best(tmp_path):
    plant_tasks(tmp_path)
    text = make_report(tmp_path, layout="1").text
    rows = _rows(text)
    assert rows["attention"] == ["listops", "text", "Avg"]
    # dense listops 0.3, 0.4, 0.5 -> 40.00 ± 10.00 ; text 0.60, 0.62, 0.64 -> 62.00 ± 2.00
    assert rows["dense"] == ["**40.00 ± 10.00**", "62.00 ± 2.00", "51.00"]
    # local text 0.70..0.72 is the best text column
    assert rows["local"] == ["20.00 ± 0.00", "**71.00 ± 1.00**", "45.50"]
    # rsa text 0.65, 0.65, 0.68: mean 66.00, std sqrt(((-1)^2+(-1)^2+2^2)/2) = 1.73
    assert rows["rsa"] == ["38.00 ± 2.00", "66.00 ± 1.73", "**52.00**"]
    assert list(rows)[1:] == ["dense", "local", "rsa"]  # sweep order
    assert "n = 3 seeds" in text and "ddof=1" in text


def test_layout2_ratios_to_dense_per_seed(tmp_path):
    plant_speed(tmp_path)
    rows = _rows(make_report(tmp_path, layout="2").text)
    assert rows["attention"] == ["steps/s (× dense) 1K", "steps/s (× dense) 2K",
                                 "peak memory (× dense) 1K", "peak memory (× dense) 2K"]
    # dense 2K: 4, 6 over mean 5 -> 0.8, 1.2 -> 1.00 ± 0.28 ; rsa 1K: 20, 30 over 10 -> 2.50 ± 0.71
    assert rows["dense"] == ["1.00 ± 0.00", "1.00 ± 0.28", "1.00 ± 0.00", "1.00 ± 0.00"]
    # rsa 2K memory 100, 300 over 400 -> 0.25, 0.75 -> 0.50 ± 0.35 ; dense does not compete
    assert rows["rsa"] == ["**2.50 ± 0.71**", "**3.00 ± 0.00**", "**0.50 ± 0.00**", "**0.50 ± 0.35**"]


def test_layout3_directions(tmp_path):
    plant_ablation(tmp_path)
    report = make_report(tmp_path)
    assert report.layout == "3"  # auto: an ablation sweep
    rows = _rows(report.text)
    assert rows["configuration"][:5] == ["listops accuracy (%)", "listops fidelity (KL)",
                                         "listops steps/s (× dense)", "listops memory (× dense)", "lm perplexity"]
    # listops: higher accuracy best (rsa), lower fidelity best among non-dense (rsa 0.15),
    # speed 30/10, 40/10 -> 3.50 ± 0.71 best, memory 50/200 -> 0.25 best
    assert rows["selection only"][:4] == ["32.00 ± 2.83", "0.600 ± 0.141", "**3.50 ± 0.71**", "**0.25 ± 0.00**"]
    assert rows["rsa"][:4] == ["**44.00 ± 2.83**", "**0.150 ± 0.071**", "2.25 ± 0.35", "0.50 ± 0.00"]
    assert rows["dense"][1] == "0.000 ± 0.000"  # dense's KL to itself is not a contender
    # lm: lower perplexity is better -> rsa (19, 21 -> 20.00 ± 1.41), not selection only (30)
    assert rows["rsa"][4] == "**20.00 ± 1.41**" and rows["selection only"][4] == "30.00 ± 0.00"


@pytest.mark.parametrize("layout", ["1", "2", "3"])
@pytest.mark.parametrize("fmt", ["md", "latex", "csv"])
def test_every_layout_in_every_format(tmp_path, layout, fmt):
    PLANTERS[layout](tmp_path / "runs")
    plot = fmt == "md"  # the plot does not depend on the format: draw it once per layout
    report = make_report(tmp_path / "runs", layout=layout, fmt=fmt, out=tmp_path / "out", plot=plot)
    text = report.text
    assert report.table_path == tmp_path / "out" / f"table{layout}.{table.EXTENSIONS[fmt]}"
    assert report.table_path.read_text() == text
    if plot:
        assert report.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if fmt == "md":
        assert "**" in text and "±" in text
    elif fmt == "latex":
        for piece in (r"\toprule", r"\midrule", r"\bottomrule", r"\textbf{", r"$\pm$"):
            assert piece in text
        assert "±" not in text and "×" not in text and not re.search(r"(?<!\\)%", text)  # escaped
        body = text.split(r"\midrule")[1].split(r"\bottomrule")[0].strip().splitlines()
        ncols = text.split(r"\begin{tabular}{l")[1].split("}")[0].count("c")
        assert all(line.count(" & ") == ncols for line in body)
    else:
        parsed = list(csv.reader(io.StringIO(text)))
        assert len({len(r) for r in parsed}) == 1 and len(parsed) >= 3
        assert any(cell.endswith("*") for row in parsed[1:] for cell in row)
        assert not any("**" in cell for row in parsed for cell in row)


def test_seed_count_shown_where_it_differs(tmp_path):
    for seed, acc in enumerate([0.5, 0.7, 0.6]):
        plant(tmp_path, f"a{seed}", label="a", task="t", seed=seed, accuracy=acc)
    plant(tmp_path, "b0", label="b", task="t", seed=0, accuracy=0.9)
    rows = _rows(make_report(tmp_path, layout="1").text)
    assert rows["a"][0] == "60.00 ± 10.00" and rows["b"][0] == "**90.00 (n=1)**"


def test_rows_and_cols_select_and_refuse_unknown(tmp_path):
    plant_ablation(tmp_path)
    rows = _rows(make_report(tmp_path, rows=["rsa", "dense"], cols=["lm"]).text)
    assert list(rows) == ["configuration", "rsa", "dense"]
    assert all(h.startswith("lm ") for h in rows["configuration"])
    with pytest.raises(ValueError, match=r"unknown rows \['nope'\]; known rows"):
        make_report(tmp_path, rows=["nope"])
    with pytest.raises(ValueError, match="unknown columns"):
        make_report(tmp_path, cols=["nope"])


def test_label_falls_back_to_metrics_attention(tmp_path):
    d = tmp_path / "x"
    d.mkdir()
    (d / "metrics.json").write_text(json.dumps({"task": "t", "attention": "nsa", "seed": 0, "accuracy": 0.5}))
    (record,) = table.load_records(tmp_path)
    assert (record.label, record.task, record.main_metric) == ("nsa", "t", "accuracy")


def test_layout2_from_a_benchmark(tmp_path):
    results = [{"preset": p, "length": L, "pass": ps, "median_ms": ms, "compiled_bytes": b}
               for p, L, ps, ms, b in [("dense", 1024, "forward", 1.0, 10), ("dense", 1024, "fwd+bwd", 4.0, 40),
                                       ("rsa", 1024, "fwd+bwd", 1.0, 10), ("dense", 2048, "fwd+bwd", 16.0, 160),
                                       ("rsa", 2048, "fwd+bwd", 2.0, 20)]]
    (tmp_path / "bench.json").write_text(json.dumps({"results": results}))
    report = make_report(tmp_path, fmt="md")
    assert report.layout == "2"
    rows = _rows(report.text)
    assert rows["rsa"] == ["**4.00**", "**8.00**", "**0.25**", "**0.12**"]  # one entry each: no std
    assert "fwd+bwd" in report.text


def test_missing_reference_and_empty_workdir_are_clear(tmp_path):
    plant(tmp_path, "r", label="rsa", task="t", seed=0, max_len=1024, steps_per_second=1.0, accuracy=0.5)
    with pytest.raises(ValueError, match="no 'dense' runs to compare with"):
        make_report(tmp_path, layout="2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no finished runs"):
        make_report(tmp_path / "empty", layout="1")
    with pytest.raises(ValueError, match="unknown format 'html'; known formats: md, latex, csv"):
        table.render(table.build_table("1", table.load_records(tmp_path)), "html")


def test_pareto_front():
    pts = [(1.0, 0.9), (2.0, 0.8), (1.5, 0.7), (3.0, 0.5), (0.5, 0.95), (2.0, 0.6)]
    assert pareto_front(pts) == [4, 0, 1, 3]
    assert pareto_front([(1.0, 10.0), (2.0, 20.0), (3.0, 15.0)], maximize=(True, False)) == [0, 2]


def test_plot_points_are_seed_means(tmp_path):
    plant_ablation(tmp_path)
    points, xtitle, ytitle = tradeoff_points(table.load_records(tmp_path), "listops")
    by = {p.label: p for p in points}
    assert by["rsa"].x.mean == pytest.approx(2.25) and by["rsa"].y.mean == pytest.approx(44.0)
    assert by["rsa"].y.std == pytest.approx(math.sqrt(8))
    assert (xtitle, ytitle) == ("training steps/s (× dense)", "accuracy (%)")


def test_table_cli_writes_table_and_plot(tmp_path, capsys):
    plant_tasks(tmp_path / "runs")
    code = cli.table_main([f"--workdir={tmp_path / 'runs'}", "--format=csv", f"--out={tmp_path / 'out'}"])
    assert code == 0
    assert capsys.readouterr().out.startswith("attention,listops,text,Avg")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["table1.csv", "table1.png"]
    assert cli.table_main([f"--workdir={tmp_path / 'nope'}"]) == 2
    assert "does not exist" in capsys.readouterr().err
