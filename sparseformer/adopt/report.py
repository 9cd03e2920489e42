"""`report.json`, `report.md` and the plots of `sparseformer adopt`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from sparseformer.train.metrics_io import write_json

MiB = 2**20


def _f(x: Any, fmt: str, none: str = "—") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return none
    return format(x, fmt)


def _metric(stage: dict[str, Any]) -> str:
    v = stage["value"]
    return f"{100 * v:.2f}%" if stage["metric"] == "accuracy" else f"{v:.4g}"


def markdown(report: dict[str, Any]) -> str:
    """The human-readable report: the verdict first, then every stage."""
    s0, s1, s2, s3 = (report["stages"].get(k) for k in ("stage0", "stage1", "stage2", "stage3"))
    v, o = report["verdict"], report["options"]
    metric = s0["metric"]
    drop_unit = "%" if metric == "perplexity" else " pts"
    lines = [
        f"# Adopting `{o['attention']}` for `{report['teacher']}`",
        "",
        f"**Verdict: {v['decision'].upper()}.** {v['reason'][v['reason'].index(':') + 2:]}",
        "",
        f"Thresholds: metric drop at most {o['max_metric_drop']:g}{drop_unit}, speed-up ({v['speedup_kind']}) at least "
        f"{o['min_speedup']:g}x, both at the data's length ({v['length']} tokens). Task `{report['task']}`, metric "
        f"`{metric}` on the test split; speed and memory of the whole model at inference on {report['backend']}.",
        "",
        "## Stages",
        "",
        f"| stage | {metric} | drop | agreement with dense | fidelity (KL) | captured | latency p50 / p95 (ms, batch 1) "
        "| throughput (/s, best batch) | compiled memory (MiB) | peak memory (MiB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for stage in (s0, s1, s2):
        if stage is None:
            continue
        sp = stage.get("speed") or (s1 or {}).get("speed") or {}
        peak = sp.get("peak_rss_bytes") or sp.get("peak_device_bytes")
        lines.append(
            f"| {stage['stage'][-1]}: {stage['title']} | {_metric(stage)} | {_f(stage.get('metric_drop'), '.2f')} | "
            f"{_f(stage.get('agreement'), '.3f')} | {_f(stage.get('fidelity'), '.4f')} | {_f(stage.get('captured'), '.3f')} | "
            f"{_f(sp.get('latency_ms_p50'), '.1f')} / {_f(sp.get('latency_ms_p95'), '.1f')} | "
            f"{_f(sp.get('throughput_per_s'), '.1f')} (b={sp.get('best_batch_size', '—')}) | "
            f"{_f(sp.get('compiled_bytes') and sp['compiled_bytes'] / MiB, '.1f')} | {_f(peak and peak / MiB, '.1f')} |")
    side = [r for r in (s3 or {}).get("lengths", []) if r["length"] == v["length"] and "error" not in r]
    if side:
        r = side[0]
        lines += ["", f"Side by side at the data's length (stage 3: both models timed in interleaved rounds, trained "
                  f"parameters) the adopted model is {_f(r['latency_speedup'], '.2f')}x faster in batch-1 latency and "
                  f"{_f(r['throughput_speedup'], '.2f')}x in throughput, with {_f(r['compiled_memory_fraction'], '.2f')} of "
                  f"dense's compiled memory ({_f(r['peak_memory_fraction'], '.2f')} of its fresh-process peak). "
                  "The per-stage speed above is each model measured on its own (stages 0 and 1, minutes apart); "
                  "stage 2 has stage 1's model and attention, so its speed and memory."]
    if s2:
        lines += ["", f"Stage 2 fine-tuned {s2['steps']} steps ({s2['train_seconds']:.0f} s) in `{s2['run_dir']}`: "
                  "a run directory for `sparseformer monitor --workdir=...`."]
    if s3:
        lines += ["", "## Dense and adopted side by side", "",
                  "| length | parameters | dense latency (ms) | adopted latency (ms) | latency speed-up | "
                  "throughput speed-up | compiled memory (fraction of dense) | peak memory (fraction of dense) |",
                  "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in s3["lengths"]:
            if "error" in r:
                lines.append(f"| {r['length']} | {r['error']} | | | | | | |")
                continue
            lines.append(f"| {r['length']} | {'trained' if r.get('trained_params') else 'random'} | "
                         f"{_f(r['dense']['latency_ms_p50'], '.1f')} | {_f(r['sparse']['latency_ms_p50'], '.1f')} | "
                         f"{_f(r['latency_speedup'], '.2f')}x | {_f(r['throughput_speedup'], '.2f')}x | "
                         f"{_f(r['compiled_memory_fraction'], '.3f')} | {_f(r['peak_memory_fraction'], '.3f')} |")
    if report.get("costs") and o.get("price_per_hour"):
        lines += ["", f"## Cost of a million predictions at {o['price_per_hour']:g} per hour", "",
                  "| length | dense | sparse | saved |", "| ---: | ---: | ---: | ---: |"]
        for c in report["costs"]:
            saved = c["dense"] - c["sparse"] if c["dense"] is not None and c["sparse"] is not None else None
            lines.append(f"| {c['length']} | {_f(c['dense'], '.2f')} | {_f(c['sparse'], '.2f')} | {_f(saved, '.2f')} |")
        lines += ["", "(one machine kept busy at the best batch size's throughput)"]
    lines += ["", "## Plots", "", "- `metric_vs_speedup.png`: the task metric against the speed-up, per stage",
              "- `fidelity.png`: fidelity (KL from dense) per layer and head, stages 1 and 2",
              "- `lengths.png`: speed-up and memory against length (stage 3)", "",
              "Seconds per stage: " + ", ".join(f"{k} {st['seconds']:.0f}" for k, st in report["stages"].items()) + ".",
              ""]
    return "\n".join(lines)


def plots(report: dict[str, Any], out: Path) -> list[str]:
    """The three figures; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    st = report["stages"]
    names = []

    # 1. metric against speed-up, per stage
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    speedup = report["verdict"]["speedup"] or math.nan  # the same model and attention in stages 1 and 2
    pts = [("0: dense", 1.0, st["stage0"]["value"])]
    if "stage1" in st:
        pts.append(("1: swapped", speedup, st["stage1"]["value"]))
    if "stage2" in st:
        pts.append(("2: fine-tuned", speedup, st["stage2"]["value"]))
    scale = 100.0 if st["stage0"]["metric"] == "accuracy" else 1.0
    xs = [p[1] for p in pts]
    ys = [scale * p[2] for p in pts]
    ax.plot(xs, ys, "-", color="0.75", zorder=1)
    colors = ["tab:gray", "tab:orange", "tab:blue"]
    yspan = (max(ys) - min(ys)) or 1.0
    for i, (label, x, y) in enumerate(zip([p[0] for p in pts], xs, ys)):
        ax.scatter([x], [y], s=60, color=colors[i], zorder=2, label=label)
        # stages 1 and 2 share their x: put one label above and one below the point
        offset = (8, 10) if i != 1 else (8, -16)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=offset, fontsize=9)
    v = report["verdict"]
    ax.axvline(v["min_speedup"], color="tab:red", ls="--", lw=1, label=f"min speed-up {v['min_speedup']:g}x")
    if st["stage0"]["metric"] != "perplexity":
        ax.axhline(scale * st["stage0"]["value"] - v["max_metric_drop"] * (1 if scale == 100 else 1), color="tab:green",
                   ls=":", lw=1, label=f"dense - {v['max_metric_drop']:g}")
    ax.set_xlabel(f"speed-up over dense ({v['speedup_kind']}, {v['length']} tokens)")
    ax.set_ylabel(st["stage0"]["metric"] + (" (%)" if scale == 100 else ""))
    ax.set_xlim(0, max([x for x in xs if math.isfinite(x)] + [v["min_speedup"]]) * 1.3 + 0.1)
    ax.set_ylim(min(ys) - 0.25 * yspan - 1e-6, max(ys) + 0.35 * yspan + 1e-6)
    ax.set_title(f"{report['options']['attention']}: {v['decision']}", fontsize=11)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "metric_vs_speedup.png", dpi=120)
    plt.close(fig)
    names.append("metric_vs_speedup.png")

    # 2. fidelity per layer and head
    panels = [(k, st[k]) for k in ("stage1", "stage2") if k in st and st[k].get("layer_fidelity")]
    if panels:
        grids = [np.asarray(s["layer_fidelity"], float) for _, s in panels]
        vmax = max(float(g.max()) for g in grids) or 1e-6
        L, H = grids[0].shape
        fig, axes = plt.subplots(1, len(panels), figsize=(1.6 + 2.2 * len(panels) + 0.6 * H * len(panels), 1.8 + 0.5 * L),
                                 squeeze=False, layout="constrained")
        for ax, (key, s), g in zip(axes[0], panels, grids):
            im = ax.imshow(g, cmap="magma_r", vmin=0.0, vmax=vmax, aspect="auto")
            ax.set_xticks(range(H), [str(h) for h in range(H)])
            ax.set_yticks(range(L), [str(i) for i in range(L)])
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
            ax.set_title(f"stage {key[-1]}: {'swapped' if key == 'stage1' else 'fine-tuned'}", fontsize=10)
            for (i, j), val in np.ndenumerate(g):
                ax.text(j, i, f"{val:.2g}", ha="center", va="center", fontsize=7,
                        color="white" if val > 0.6 * vmax else "black")
        fig.colorbar(im, ax=list(axes[0]), fraction=0.05, pad=0.04, label="KL(dense || sparse)")
        fig.suptitle("fidelity per layer and head (lower: closer to dense)", fontsize=10)
        fig.savefig(out / "fidelity.png", dpi=120)
        plt.close(fig)
        names.append("fidelity.png")

    # 3. speed-up and memory against length
    rows = [(r["length"], r) for r in st.get("stage3", {}).get("lengths", []) if "error" not in r]
    if rows:
        rows.sort(key=lambda r: r[0])
        lens = [r[0] for r in rows]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
        for key, label in (("latency_speedup", "latency (batch 1)"), ("throughput_speedup", "throughput")):
            a1.plot(lens, [r[1].get(key) or np.nan for r in rows], "o-", label=label)
        a1.axhline(1.0, color="0.6", lw=1)
        a1.set(xscale="log", xlabel="tokens", ylabel="speed-up over dense", title="speed")
        for key, label in (("compiled_memory_fraction", "compiled"), ("peak_memory_fraction", "fresh-process peak")):
            a2.plot(lens, [r[1].get(key) or np.nan for r in rows], "o-", label=label)
        a2.set(xscale="log", xlabel="tokens", ylabel="fraction of dense", title="memory", ylim=(0, None))
        for a in (a1, a2):
            a.set_xticks(lens, [str(n) for n in lens])
            a.minorticks_off()
            a.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "lengths.png", dpi=120)
        plt.close(fig)
        names.append("lengths.png")
    return names


def write(report: dict[str, Any], out: Path) -> dict[str, Any]:
    """`report.json`, `report.md` and the plots in `out`."""
    report = {**report, "plots": plots(report, out)}
    write_json(out / "report.json", report)
    tmp = out / "report.md.tmp"
    tmp.write_text(markdown(report))
    tmp.replace(out / "report.md")
    return report
