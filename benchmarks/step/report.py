"""The step benchmark's JSON, markdown and plot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from harness import write_text  # noqa: E402  (benchmarks/)

from .sweep import CELL_KEY, largest_fitting_k, summarize


def _fmt(v, spec="{:.1f}"):
    return "-" if v is None else spec.format(v)


def _panels(rows):
    """``(config, shape, groups_per_step, ref)`` in the order the rows came."""
    return list(dict.fromkeys((r["config"], r["shape"], r["groups_per_step"], r["ref"]) for r in rows))


def headline(meta, rows, summary) -> list[str]:
    """c's speed-up over a (and b) per K (rows) and panel (columns)."""
    others = [m for m in ("a", "b") if m in meta["methods"]] if "c" in meta["methods"] else []
    if not others:
        return []
    panels = _panels(rows)
    lines = [
        "Speed-up of (c) sdpo_fast in groups/s (= step-time ratio) over " + " / ".join(f"({m})" for m in others)
        + ", same run; every method trains the same groups per optimizer step, each at its largest micro-batch.",
        "",
        "| K | " + " | ".join(f"{c} {s} N={n} ref {r}" for c, s, n, r in panels) + " |",
        "|" + "---|" * (len(panels) + 1),
    ]
    by = {tuple(s[k] for k in CELL_KEY): s for s in summary}
    for k in sorted({r["K"] for r in rows}):
        cells = []
        for c, s, n, r in panels:
            cfg, mode = c.split(":")
            x = by.get((c, mode, s, k, n, r), {})
            cells.append(" / ".join(_fmt(x.get(f"speedup_c_vs_{o}"), "{:.2f}x") for o in others))
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return lines + [""]


def markdown(meta, rows, summary) -> str:
    lines = [f"# S-DPO training step: {meta['device']}", ""]
    lines += headline(meta, rows, summary)
    lines += [f"- {k}: {v}" for k, v in meta.items() if k not in ("benchmark", "methods", "notes", "models")]
    lines += [f"- model {k}: {v}" for k, v in meta["models"].items()]
    lines += [f"- method {k}: {v}" for k, v in meta["methods"].items()]
    lines += [f"- note: {n}" for n in meta["notes"]]
    lines.append("")
    by_key = {tuple(r[k] for k in CELL_KEY) + (r["method"],): r for r in rows}
    fits = largest_fitting_k(rows)
    methods = list(meta["methods"])
    for c, s, n, ref in _panels(rows):
        mode = c.split(":")[1]
        lines += [f"## {c}, shape {s}, {n} groups per step, reference {ref}", ""]
        head = (["K"] + [f"{m} ms" for m in methods] + [f"{m} groups/s" for m in methods]
                + [f"c vs {m}" for m in methods if m != "c"] + [f"{m} micro-batch" for m in methods]
                + [f"{m} epoch h" for m in methods] + [f"{m} mem MiB" for m in methods]
                + [f"{m} check" for m in methods if m != "a"])
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for k in sorted({r["K"] for r in rows if (r["config"], r["shape"], r["groups_per_step"], r["ref"]) == (c, s, n, ref)}):
            rs = {m: by_key.get((c, mode, s, k, n, ref, m), {}) for m in methods}
            summ = next((x for x in summary if tuple(x[f] for f in CELL_KEY) == (c, mode, s, k, n, ref)), {})
            cells = [str(k)]
            cells += [_fmt(rs[m].get("ms")) if "ms" in rs[m] else rs[m].get("status", "-") for m in methods]
            cells += [_fmt(rs[m].get("groups_per_s"), "{:.3g}") for m in methods]
            cells += [_fmt(summ.get(f"speedup_c_vs_{m}"), "{:.2f}x") for m in methods if m != "c"]
            cells += [str(rs[m].get("micro_batch", "-")) for m in methods]
            cells += [_fmt(rs[m].get("epoch_h"), "{:.3g}") for m in methods]
            cells += [_fmt(rs[m].get("mem_mib")) for m in methods]
            cells += [rs[m].get("check", "-") for m in methods if m != "a"]
            lines.append("| " + " | ".join(cells) + " |")
        fit = fits.get(f"{c} {s} N={n} {ref}", {})
        lines += ["", "Largest K that ran: " + ", ".join(f"{m} {fit.get(m)}" for m in methods), ""]
    lines += ["## All rows", ""]
    cols = ["config", "shape", "K", "groups_per_step", "ref", "method", "status", "micro_batch", "accumulation",
            "search", "ms", "ms_spread", "groups_per_s", "tokens_per_s", "epoch_h", "tokens_processed", "mem_mib",
            "step_mib", "capture_mib", "loss", "grad_norm", "logps_rel_err", "grad_rel_err", "ref32_loss_abs_err",
            "ref32_logps_rel_err", "ref32_grad_rel_err", "check", "graph_loss_rel_err", "graph_grad_rel_err", "graph_check"]
    cols = [c for c in cols if any(c in r for r in rows)]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "-")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(meta, rows, summary, path: Path) -> bool:
    """Groups/s and c's speed-up against K, one row of panels per (config, shape, N, ref). False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return False
    panels = _panels(rows)
    fig, axes = plt.subplots(len(panels), 2, figsize=(11, 3.4 * len(panels)), squeeze=False)
    colors = {"a": "tab:red", "b": "tab:orange", "c": "tab:blue"}
    ks = sorted({r["K"] for r in rows})
    for (c, s, n, ref), (ax_g, ax_s) in zip(panels, axes):
        mode = c.split(":")[1]
        for m, label in meta["methods"].items():
            rs = [r for r in rows if (r["config"], r["shape"], r["groups_per_step"], r["ref"], r["method"]) == (c, s, n, ref, m)]
            pts = [(r["K"], r["groups_per_s"]) for r in rs if r.get("groups_per_s") is not None]
            if pts:
                ax_g.plot(*zip(*pts), "o-", color=colors[m], label=f"({m}) {label}")
            oom = [r["K"] for r in rs if r["status"] == "OOM"]
            if oom:
                ax_g.plot(oom, [0.02] * len(oom), "x", color=colors[m], ms=10, mew=2,
                          transform=ax_g.get_xaxis_transform(), label=f"({m}) OOM")
        for other, style in (("a", "o-"), ("b", "s--")):
            pts = [(x["K"], x[f"speedup_c_vs_{other}"]) for x in summary
                   if tuple(x[f] for f in CELL_KEY if f != "K") == (c, mode, s, n, ref) and f"speedup_c_vs_{other}" in x]
            if pts:
                ax_s.plot(*zip(*pts), style, color=colors[other], label=f"c vs {other}")
        ax_s.axhline(1.0, color="grey", lw=0.8)
        for ax, ylabel in ((ax_g, "groups/s"), (ax_s, "speed-up of (c)")):
            ax.set_xscale("log", base=2)
            ax.set_xticks(ks, [str(k) for k in ks])
            ax.minorticks_off()
            ax.set_xlabel("K (negatives per group)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{c}, {s}, N={n}, ref {ref}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        ax_g.set_yscale("log")
    fig.suptitle(f"S-DPO optimizer step, {meta['dtype']} on {meta['device']} ({meta['date'][:10]})", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def write(meta, rows, out_dir: Path, name: str, make_plot: bool = True) -> dict:
    """Write ``name``.json / .md / .png into ``out_dir``; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(rows)
    paths = {"json": out_dir / f"{name}.json", "md": out_dir / f"{name}.md"}
    result = {"meta": meta, "summary": summary, "largest_k": largest_fitting_k(rows), "rows": rows}
    write_text(paths["json"], json.dumps(result, indent=2) + "\n")
    text = markdown(meta, rows, summary)
    if make_plot and plot(meta, rows, summary, out_dir / f"{name}.png"):
        paths["png"] = out_dir / f"{name}.png"
        text = text.replace("\n## All rows", f"\n![groups/s and speed-up vs K]({name}.png)\n\n## All rows", 1)
    write_text(paths["md"], text)
    return paths
