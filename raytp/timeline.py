"""A per-rank timeline of training steps, drawn from the ranks' metrics rows.

One row of bars per rank: each phase (forward, backward, optimizer step) starts at
the host time the rank entered it (``phase_starts``) and lasts its measured time
(``{phase}_s``: CUDA events on GPUs, where the kernels run behind the host, so a bar
there is where the host issued the phase, for as long as the GPU took). The pale end
of a bar is the host time the rank spent inside blocking collectives in that phase
(``{phase}_comm_s``: on CPU ranks, mostly waiting for a slower rank; drawn at the end
of the phase, wherever in it the collectives were). A light gray band is the rank's
host time inside the step call; white between bands is a rank idle, waiting for the
driver's next call. A straggling step is outlined in red and its rank's
label turns red; a skipped step (non-finite loss) is hatched. The x axis is wall time
since the first step shown began. Pure matplotlib (Agg), no pyplot state.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch

PHASE_COLORS = {"forward": "#4c72b0", "backward": "#dd8452", "optim": "#55a868"}
HOST_COLOR, STRAGGLER_COLOR = "#e4e4e4", "#d62728"


def timed_rows(rows: Sequence[dict], steps: int | None = None) -> list[dict]:
    """The rows with host times (``t_begin`` and ``phase_starts``) of the last ``steps``
    steps (all when None); a step's rows are consecutive, one per rank."""
    rows = [r for r in rows if r.get("t_begin") is not None and r.get("phase_starts")]
    if not rows:
        raise ValueError("no step has host timestamps to draw: run training steps first")
    if steps is not None:
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps={steps!r} must be a positive integer (the last steps to draw) or None")
        world_size = len({r["rank"] for r in rows})
        rows = rows[-steps * world_size:]
    return rows


def plot_timeline(rows: Sequence[dict], path: str | Path, *, steps: int | None = None,
                  title: str | None = None) -> str:
    """Draw the timeline of the last ``steps`` steps (all when None) of ``rows`` (as
    ``TPCluster.metrics()`` returns them) into the PNG file ``path``; returns its path."""
    rows = timed_rows(rows, steps)
    ranks = sorted({r["rank"] for r in rows})
    t0 = min(r["t_begin"] for r in rows)
    span = max(r["t_end"] for r in rows) - t0
    fig = Figure(figsize=(12, 1.6 + 0.5 * len(ranks)), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for row in rows:
        _draw_step(ax, row, t0)
    _label_steps(ax, rows, t0, span)
    slow = {r["rank"] for r in rows if r.get("straggler")}
    ax.set_yticks(ranks, [f"rank {r}" for r in ranks])
    for label, rank in zip(ax.get_yticklabels(), ranks, strict=True):
        label.set_color(STRAGGLER_COLOR if rank in slow else "black")
    ax.set_ylim(max(ranks) + 0.7, min(ranks) - 0.9)  # rank 0 on top, room for the step labels
    ax.set_xlim(-0.005 * span, 1.01 * span)
    ax.set_xlabel("seconds since the first step shown began (host clock)")
    n_steps = len(rows) // len(ranks)
    ax.set_title(title or f"raytp timeline: {n_steps} steps on {len(ranks)} ranks"
                 + (f"; stragglers: ranks {sorted(slow)}" if slow else ""))
    ax.grid(axis="x", alpha=0.3)
    fig.legend(handles=_legend(), loc="lower center", ncol=7, frameon=False, fontsize="small")
    fig.tight_layout(rect=(0, 0.12 if len(ranks) < 4 else 0.06, 1, 1))
    fig.savefig(path)
    return str(path)


def _draw_step(ax, row: dict, t0: float) -> None:
    y = row["rank"]
    straggled = bool(row.get("straggler"))
    ax.broken_barh([(row["t_begin"] - t0, row["t_end"] - row["t_begin"])], (y - 0.42, 0.84),
                   facecolors=HOST_COLOR, edgecolors=STRAGGLER_COLOR if straggled else "none",
                   linewidth=2 if straggled else 0, zorder=1)
    hatch = "xx" if row.get("skipped") else None
    for phase, color in PHASE_COLORS.items():
        start, seconds = row["phase_starts"].get(phase), row.get(f"{phase}_s")
        if start is None or seconds is None:
            continue
        waited = min(row.get(f"{phase}_comm_s") or 0.0, seconds)
        busy = (start - t0, seconds - waited)
        ax.broken_barh([busy, (busy[0] + busy[1], waited)], (y - 0.32, 0.64),
                       facecolors=[color, _pale(color)], hatch=hatch,
                       edgecolors="white" if hatch else "none", zorder=2)


def _pale(color: str) -> tuple[float, ...]:
    rgb = to_rgb(color)
    return tuple(0.35 * c + 0.65 for c in rgb)


def _label_steps(ax, rows: Sequence[dict], t0: float, span: float) -> None:
    """The step number above each step's first rank, where it does not overlap the last."""
    top = min(r["rank"] for r in rows)
    last = -span
    for r in rows:
        x = r["t_begin"] - t0
        if r["rank"] == top and x - last > 0.06 * span:
            ax.text(x, top - 0.5, f"step {r['step']}", fontsize="x-small", va="bottom", ha="left",
                    color="#444444")
            last = x


def _legend() -> list[Patch]:
    handles = [Patch(facecolor=c, label=p) for p, c in PHASE_COLORS.items()]
    handles.append(Patch(facecolor=_pale("#777777"), label="in collectives"))
    handles.append(Patch(facecolor=HOST_COLOR, label="host time in the call"))
    handles.append(Patch(facecolor="white", edgecolor="#999999", label="idle (white)"))
    handles.append(Patch(facecolor=HOST_COLOR, edgecolor=STRAGGLER_COLOR, linewidth=2, label="straggler"))
    return handles
