"""`rlhf-engine plot RUN_DIR`: PNG plots of a run's metrics and of its process timeline."""

from __future__ import annotations

from pathlib import Path

from rlhf_engine.telemetry.files import METRICS_FILE, TIMELINE_FILE, read_jsonl

# One PNG per entry: file name -> (title, metric keys drawn on it; `prefix*` draws every key that starts so)
CURVES: dict[str, tuple[str, tuple[str, ...]]] = {
    "reward.png": ("reward", ("env/reward_mean", "env/gold_mean")),
    "eval.png": ("held-out evaluation (data.eval_prompts)", ("eval/reward_mean", "eval/gold_mean", "eval/pass@*")),
    "eval_length.png": ("held-out response length (tokens)", ("eval/response_length_mean",)),
    "kl.png": ("KL to reference", ("objective/kl",)),
    "kl_coef.png": ("KL coefficient", ("objective/kl_coef",)),
    "entropy.png": ("policy entropy", ("objective/entropy",)),
    "losses.png": ("losses", ("ppo/loss/policy", "ppo/loss/value")),
    "throughput.png": ("throughput (tokens/s)", ("time/tokens_per_s",)),
}


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write the PNGs of `run_dir` into `run_dir/plots/` and return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_jsonl(run_dir / METRICS_FILE)
    if not rows:
        raise FileNotFoundError(f"{run_dir / METRICS_FILE} has no metrics: is {run_dir} a run directory?")
    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    written = []
    for name, (title, keys) in CURVES.items():
        present = [k for k in _expand(keys, rows) if any(isinstance(r.get(k), (int, float)) for r in rows)]
        if not present:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for k in present:
            pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k, marker=".")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
        written.append(out_dir / name)
    timeline = read_jsonl(run_dir / TIMELINE_FILE)
    if timeline:
        written.append(plot_timeline(timeline, out_dir / "timeline.png"))
    return written


def _expand(keys: tuple[str, ...], rows: list[dict]) -> list[str]:
    """`keys` with each `prefix*` replaced by the metric keys of `rows` that start with the prefix (sorted)."""
    out = []
    for k in keys:
        out += sorted({m for r in rows for m in r if m.startswith(k[:-1])}) if k.endswith("*") else [k]
    return out


def plot_timeline(intervals: list[dict], path: Path) -> Path:
    """A Gantt chart: one row per process, one bar per busy interval, coloured by phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = min(iv["start"] for iv in intervals)
    procs = sorted({iv["proc"] for iv in intervals})
    phases = sorted({iv["phase"] for iv in intervals})
    colors = {p: plt.cm.tab10(i % 10) for i, p in enumerate(phases)}
    fig, ax = plt.subplots(figsize=(10, 1 + 0.6 * len(procs)))
    for row, proc in enumerate(procs):
        for iv in (iv for iv in intervals if iv["proc"] == proc):
            ax.barh(row, iv["end"] - iv["start"], left=iv["start"] - t0, color=colors[iv["phase"]], height=0.6)
    ax.set_yticks(range(len(procs)), procs)
    ax.set_xlabel("seconds since start (white = idle)")
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=colors[p]) for p in phases], labels=phases,
              fontsize=7, ncol=min(len(phases), 6), loc="upper center", bbox_to_anchor=(0.5, -0.35))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
