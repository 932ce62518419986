"""Turn an e2e JSON (bench/e2e.py) into a markdown table and PNG plots (throughput by batch and input
length, normalised to fdpp, as in the paper's figures).

    python bench/report_e2e.py bench/results/e2e_NVIDIA_H200_2026-11-26.json
"""
from __future__ import annotations

import json
import os
import sys


def table(data: dict) -> str:
    gpu, date = data["gpu"], data["date"]
    bw = data.get("copy_bandwidth_gbs")
    lines = [f"GPU: {gpu}; date {date}; torch {data.get('torch')}, triton {data.get('triton')}; "
             f"measured copy bandwidth {bw:.0f} GB/s" if bw else f"GPU: {gpu}; date {date}", ""]
    hf = {(r["model"], r["mode"], r["batch_size"], r["input_len"]): r for r in data.get("transformers", [])
          if "error" not in r}
    lines.append("| model | batch | input | fdpp TTFT ms | fdpp step ms | fdpp tok/s | % of copy bw | "
                 "HF eager tok/s | HF static tok/s | fdpp / HF static |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for r in data.get("fdpp", []):
        if r.get("eager"):
            continue
        key = (r["model"], r["batch_size"], r["input_len"])
        e = hf.get((key[0], "eager", key[1], key[2]))
        s = hf.get((key[0], "static", key[1], key[2]))
        tps = r["decode_tokens_per_s"]
        e_str = f"{e['decode_tokens_per_s']:.1f}" if e else "-"
        s_str = f"{s['decode_tokens_per_s']:.1f}" if s else "-"
        ratio = f"{tps / s['decode_tokens_per_s']:.2f}x" if s else "-"
        lines.append(
            f"| {r['model']} | {r['batch_size']} | {r['input_len']} | {r['prefill_ms']:.1f} | "
            f"{r['decode_step_ms']:.2f} | {tps:.1f} | {r['pct_of_copy_bw'] or 0:.1f} | {e_str} | {s_str} | {ratio} |"
        )
    return "\n".join(lines) + "\n"


def plot(data: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data.get("fdpp", []) if not r.get("eager")]
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    hf = {(r["model"], r["mode"], r["batch_size"], r["input_len"]): r for r in data.get("transformers", [])
          if "error" not in r}
    for ax, model in zip(axes[0], models):
        mr = [r for r in rows if r["model"] == model]
        for n_in in sorted({r["input_len"] for r in mr}):
            pts = sorted((r["batch_size"], r["decode_tokens_per_s"]) for r in mr
                         if r["input_len"] == n_in)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"fdpp, input {n_in}")
            for mode, style in (("static", "--"), ("eager", ":")):
                hp = sorted((b, hf[(model, mode, b, n_in)]["decode_tokens_per_s"]) for b in [p[0] for p in pts]
                            if (model, mode, b, n_in) in hf)
                if hp:
                    ax.plot([p[0] for p in hp], [p[1] for p in hp], style, marker="x",
                            label=f"transformers {mode}, input {n_in}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("decode tokens/s (all sequences)")
        ax.set_title(f"{model} fp16 on {data['gpu']}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_normalized(data: dict, path: str) -> bool:
    """Bars of decode throughput normalised to fdpp (= 1) per (batch, input) with peers, as in the paper."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hf = {(r["model"], r["mode"], r["batch_size"], r["input_len"]): r for r in data.get("transformers", [])
          if "error" not in r}
    rows = [r for r in data.get("fdpp", []) if not r.get("eager")
            and any((r["model"], m, r["batch_size"], r["input_len"]) in hf for m in ("eager", "static"))]
    if not rows:
        return False
    labels = [f"{r['model']}\nbs{r['batch_size']} in{r['input_len']}" for r in rows]
    series = {"fdpp": [1.0] * len(rows)}
    for mode in ("static", "eager"):
        series[f"transformers {mode}"] = [
            hf[(r["model"], mode, r["batch_size"], r["input_len"])]["decode_tokens_per_s"] / r["decode_tokens_per_s"]
            if (r["model"], mode, r["batch_size"], r["input_len"]) in hf else 0.0
            for r in rows
        ]
    fig, ax = plt.subplots(figsize=(1.8 * len(rows) + 2, 4))
    width = 0.8 / len(series)
    for i, (name, vals) in enumerate(series.items()):
        ax.bar([x + i * width for x in range(len(rows))], vals, width, label=name)
    ax.set_xticks([x + width for x in range(len(rows))])
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("decode throughput / fdpp")
    ax.set_title(f"Decode throughput normalised to fdpp, fp16, {data['gpu']}")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    src = sys.argv[1]
    with open(src) as f:
        data = json.load(f)
    base = os.path.splitext(src)[0]
    md = table(data)
    with open(base + ".md", "w") as f:
        f.write(md)
    print(md)
    try:
        plot(data, base + ".png")
        print("wrote", base + ".png")
        if plot_normalized(data, base + "_normalized.png"):
            print("wrote", base + "_normalized.png")
    except ImportError:
        print("matplotlib not installed: no plot")


if __name__ == "__main__":
    main()
