"""The per-module drift heatmap the wandb sink shows (and ``sqsd report`` draws): matplotlib figures made outside
pyplot, so nothing global is registered and a long run's refreshes keep memory flat."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def new_figure(figsize: tuple[float, float], ncols: int = 1):
    """A Figure and its axes, outside pyplot: nothing is registered globally (no backend switch, nothing to close,
    freed when dropped)."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(1, ncols)


def layer_heatmap(drift_rows: Iterable[dict], set_kinds: dict[str, str], max_columns: int = 400) -> Figure:
    """Per-module drift (mean danger cosine − mean safety cosine) over steps: which layers move toward danger.
    The rows are read one at a time and at most ``max_columns`` columns are kept (adjacent steps averaged once there
    are more), so a refresh late in a long run takes as little memory as an early one."""
    keys, modules, columns, width, first, last = list(set_kinds), None, [], 1, None, None
    for r in drift_rows:
        modules = modules or list(r["layers"])
        first, last = first if first is not None else r["step"], r["step"]
        column = []
        for m in modules:
            by_kind = defaultdict(list)
            for k, v in zip(keys, r["layers"][m]["cosine"]):
                by_kind[set_kinds[k]].append(v)
            mean = {kind: sum(v) / len(v) for kind, v in by_kind.items()}
            column.append(mean.get("danger", 0.0) - mean.get("safety", 0.0))
        if columns and columns[-1][1] < width:  # the open column still takes steps
            total, n = columns[-1]
            columns[-1] = ([a + b for a, b in zip(total, column)], n + 1)
        else:
            columns.append((column, 1))
        if len(columns) > max_columns:  # twice as many steps per column from here on
            columns = [([a + b for a, b in zip(x[0], y[0])], x[1] + y[1]) if y else x
                       for x, y in zip(columns[::2], [*columns[1::2], None])]
            width *= 2
    grid = [[total[i] / n for total, n in columns] for i in range(len(modules))]
    fig, ax = new_figure((7, max(3.0, 0.12 * len(modules) + 1.5)))
    bound = max((abs(v) for row in grid for v in row), default=1.0) or 1.0
    im = ax.imshow(grid, aspect="auto", cmap="RdBu_r", vmin=-bound, vmax=bound, interpolation="nearest",
                   extent=(first - 0.5, last + 0.5, len(modules) - 0.5, -0.5))
    step = max(1, len(modules) // 30)
    ax.set_yticks(range(0, len(modules), step), [modules[i] for i in range(0, len(modules), step)], fontsize=6)
    ax.set(xlabel="optimizer step", title="Per-module drift (danger − safety cosine)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    return fig
