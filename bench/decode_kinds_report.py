"""The report of bench/bench_decode_kinds.py: its lines per shape, its closing table and its plot."""

from __future__ import annotations

from pathlib import Path

NAN = float("nan")


def shape_lines(shape: dict) -> list[str]:
    """Per row: us per call (spread), TB/s, share of the read stream, speed vs the baseline (median, range of the
    per-round ratios; > 1: faster), error against the reference; errors and notes."""
    lines = [f"  {'row':22s} {'us':>9} {'spread':>7} {'TB/s':>6} {'/read':>6}  vs {shape['baseline']}"]
    for name, r in shape["results"].items():
        notes = " ".join(
            x
            for x in (
                f"picks {r['picks']}" if "picks" in r else "",
                f"padded to S={r['padded_to']}" if "padded_to" in r else "",
                f"lowered for CUDA ({', '.join(r['kernels'])}), not run" if "lowered" in r else "",
            )
            if x
        )
        if "error" in r:
            lines.append(f"  {name:22s} ERROR {r['error'][:1200]} {notes}")
        elif "time_s" in r:
            s = r["speed_vs_baseline"]
            lines.append(
                f"  {name:22s} {r['time_s'] * 1e6:9.1f} {r['spread_s'] * 1e6:7.1f} {r['tbps']:6.3f} "
                f"{r['of_read']:6.0%}  {s['median']:.3f} ({s['min']:.3f}-{s['max']:.3f})  err {r['rel_err']:.1e}  "
                f"first call {r['first_call_s']:.1f}s {notes}"
            )
        else:
            lines.append(f"  {name:22s} {notes}")
    return lines


def speed(shape: dict, name: str) -> float:
    """The row's median per-round speed against the shape's baseline (> 1: faster); NaN where not timed."""
    return shape["results"].get(name, {}).get("speed_vs_baseline", {}).get("median", NAN)


def table(report: dict) -> str:
    """Per shape and row: us per call and TB/s (interleaved medians), then the median per-round speed against
    torch cuDNN (> 1: faster; where torch cuDNN was not timed, against the shape's baseline, marked *)."""
    shapes = report["shapes"]
    rows = list(dict.fromkeys(name for s in shapes for name in s["results"]))
    get = lambda s, name, key: s["results"].get(name, {}).get(key, NAN)
    w = {name: max(15, len(name)) for name in rows}  # launch rows (ROW@B,S,W,T) are wider than the 15 of the rest
    head = f"{'shape':>20} " + " ".join(f"{name:>{w[name]}}" for name in rows)
    run = report["runs"][-1]
    copy = run.get("copy", {}).get("tbps", NAN)
    lines = [f"read stream {run['read']['tbps']:.3f} TB/s, device copy {copy:.3f} TB/s (read + write)"]
    for title, cell in (
        ("us per call", lambda s, name: f"{get(s, name, 'time_s') * 1e6:{w[name]}.1f}"),
        ("TB/s (K+V bytes the lengths hold; Q8/FP8: their own)", lambda s, n: f"{get(s, n, 'tbps'):{w[n]}.3f}"),
        ("speed vs torch_cudnn (median of the per-round ratios)", lambda s, name: f"{speed(s, name):{w[name]}.3f}"),
    ):
        lines += [title, head]
        for s in shapes:
            mark = "*" if title.startswith("speed") and s["baseline"] != "torch_cudnn" else " "
            lines.append(f"{s['name']:>19}{mark} " + " ".join(cell(s, name) for name in rows))
    if any(s["baseline"] != "torch_cudnn" for s in shapes):
        lines.append(
            "*: torch cuDNN not timed there; against " + ", ".join(sorted({str(s["baseline"]) for s in shapes}))
        )
    if any(s.get("lengths") for s in shapes):
        lines.append("ragged shapes: torch rows read every sequence to the longest (padded); TB/s counts the lengths")
    return "\n".join(lines)


def plot(report: dict, path: Path, log) -> None:
    try:
        import matplotlib
    except ImportError:
        log("matplotlib is not importable: no plot")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = report["shapes"]
    rows = [
        n
        for n in dict.fromkeys(n for s in shapes for n in s["results"])
        if any("tbps" in s["results"].get(n, {}) for s in shapes)
    ]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(14, 8), sharex=True)
    width = 0.8 / max(1, len(rows))
    x = list(range(len(shapes)))
    for i, name in enumerate(rows):
        result = lambda s, name=name: s["results"].get(name, {})
        top.bar([j + i * width for j in x], [result(s).get("tbps", 0.0) for s in shapes], width, label=name)
        bottom.bar([j + i * width for j in x], [speed(s, name) for s in shapes], width)
    run = report["runs"][-1]
    top.axhline(run["read"]["tbps"], color="k", ls="--", lw=1, label="read stream")
    if "copy" in run:
        top.axhline(run["copy"]["tbps"], color="k", ls=":", lw=1, label="device copy (read + write)")
    bottom.axhline(1.0, color="k", lw=1)
    top.set_ylabel("TB/s (K+V bytes the lengths hold / time)")
    baselines = ", ".join(sorted({str(s["baseline"]) for s in shapes}))
    bottom.set_ylabel(f"speed vs {baselines}\n(median per-round ratio; > 1: faster)")
    bottom.set_xticks([j + 0.4 - width / 2 for j in x], [s["name"] for s in shapes], rotation=20, fontsize=8)
    top.set_title(f"Decode attention, every jkv cache kind, on {run['meta']['gpu']} ({run['meta']['date']})")
    top.legend(ncol=4, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    log(f"plot: {path}")
