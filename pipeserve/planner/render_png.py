"""`pipeserve plan --png F`: the fitting layouts side by side, in three panels sharing the layout axis: output
tokens/s (the bar's label names the bottleneck), time per output token and time to first token, and memory
per device (weights and KV pool of the busiest stage's rank)."""

from __future__ import annotations

from pipeserve.planner.plan import Row


def write_png(rows: list[Row], title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fitting = [r for r in rows if r.status == "ok"]
    names = [f"TP={r.tp}\nPP={r.pp}" for r in fitting]
    x = range(len(fitting))
    fig, (tput, lat, mem) = plt.subplots(1, 3, figsize=(max(9, 2.2 * len(fitting) + 4), 4.2))
    bars = tput.bar(x, [r.output_tok_s for r in fitting], color="tab:blue")
    for bar, r in zip(bars, fitting, strict=True):
        tput.annotate(r.bottleneck, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                      va="bottom", fontsize=7)
    tput.set_title("output tokens/s")
    width = 0.4
    lat.bar([i - width / 2 for i in x], [r.tpot_ms for r in fitting], width, label="TPOT ms")
    lat.bar([i + width / 2 for i in x], [r.ttft_ms for r in fitting], width, label="TTFT ms")
    lat.set_yscale("log")
    lat.set_title("latency (ms, log scale)")
    lat.legend(fontsize=7)
    weights = [max(r.stage_weights_bytes) / 1e9 for r in fitting]
    kv = [max(r.stage_kv_bytes) / 1e9 for r in fitting]
    mem.bar(x, weights, label="weights")
    mem.bar(x, kv, bottom=weights, label="KV pool")
    mem.set_title("GB per device (busiest stage)")
    mem.legend(fontsize=7)
    for ax in (tput, lat, mem):
        ax.set_xticks(list(x), names, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
