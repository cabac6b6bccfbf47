"""run.png: a run's metrics over its steps, one panel per concern, drawn from metrics.jsonl.

    python -m gantry plot RUN_DIR          # writes RUN_DIR/run.png
    from gantry.watch.plot import plot_run  # the same, from code (the end of a run)

A panel is drawn when the records have at least one of its keys (a GRPO run has rewards and KL,
an SFT run loss, validation loss and tokens/s; metrics added later simply appear). The y label
is the metric's unit from `gantry.comm.metrics`. matplotlib is imported inside `plot_run` (Agg,
no display, no pyplot state), so importing this module costs nothing.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from gantry.comm.metrics import METRICS

PNG_NAME = "run.png"
COLUMNS = 3
PANEL_INCHES = (4.8, 3.0)  # width, height of one panel
DPI = 100


class PlotError(RuntimeError):
    """A run directory that cannot be plotted (the message is the one line to show)."""


@dataclass(frozen=True)
class Panel:
    title: str
    keys: tuple[str, ...]  # series drawn, those the records have
    band: tuple[str, str] | None = None  # (mean, std): mean ± std shaded
    prefix: str = ""  # also every key starting with it (reward/<function>)
    validation: tuple[str, ...] = ()  # keys of the validation records (SFT)


PANELS = (
    Panel(
        "reward",
        ("reward_mean", "reward_min", "reward_max"),
        band=("reward_mean", "reward_std"),
        prefix="reward/",
    ),
    Panel("loss", ("loss",), validation=("val_loss",)),
    Panel("KL", ("kl_ref", "kl_behaviour")),
    Panel("completion length", ("completion_len_mean", "completion_len_max")),
    Panel("entropy", ("entropy",)),
    Panel("staleness", ("staleness_mean", "staleness_max")),
    Panel("idle fraction", ("policy_idle_fraction", "rollout_idle_fraction")),
    Panel(
        "no signal / truncated",
        ("groups_all_equal_fraction", "truncated_fraction"),
    ),
    Panel("importance ratio", ("ratio_mean", "ratio_max", "clip_fraction")),
    Panel("tokens/s", ("tokens_per_s", "completion_tokens_per_s")),
    Panel("samples/s", ("samples_per_s",)),
    Panel("padding fraction", ("padding_fraction",)),
    Panel("weight sync", ("weight_sync_s",)),
    Panel("grad norm", ("grad_norm",)),
    Panel("learning rate", ("lr",)),
)


@dataclass
class Series:
    """The numbers of a run: per step (the last record of a step wins: a resumed run writes
    the steps after its checkpoint again) and per validation."""

    steps: dict[int, dict[str, float]]
    validations: dict[int, dict[str, float]]

    def names(self) -> set[str]:
        return {k for r in (*self.steps.values(), *self.validations.values()) for k in r}

    def line(self, key: str, validation: bool = False) -> tuple[list[int], list[float]]:
        records = self.validations if validation else self.steps
        points = sorted((s, r[key]) for s, r in records.items() if key in r)
        return [s for s, _ in points], [v for _, v in points]


def read_metrics(run_dir: str | Path) -> Series:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(
            f"no metrics.jsonl in {run_dir}: not a run directory, or no step has finished yet"
        )
    series = Series({}, {})
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise PlotError(f"{path}:{number} is not a JSON record") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise PlotError(f"{path}:{number} has no integer 'step'")
        numbers = {k: float(v) for k, v in record.items() if _is_number(v) and k != "step"}
        target = series.validations if record.get("validation") else series.steps
        target.setdefault(record["step"], {}).update(numbers)
    if not series.steps and not series.validations:
        raise PlotError(f"{path} holds no step yet: nothing to plot")
    return series


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def panels_for(series: Series) -> list[Panel]:
    """The panels whose keys the run has, in the order of PANELS."""
    have = series.names()
    return [
        p
        for p in PANELS
        if have & {*p.keys, *p.validation}
        or (p.prefix and any(k.startswith(p.prefix) for k in have))
    ]


def figure_size(panels: int) -> tuple[int, int]:
    """Pixels (width, height) of run.png for `panels` panels."""
    rows = max(1, math.ceil(panels / COLUMNS))
    return round(COLUMNS * PANEL_INCHES[0] * DPI), round(rows * PANEL_INCHES[1] * DPI)


def plot_run(run_dir: str | Path) -> Path:
    """Write RUN_DIR/run.png from RUN_DIR/metrics.jsonl; its path. PlotError with one line when
    there is nothing to plot."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no display

    run_dir = Path(run_dir)
    series = read_metrics(run_dir)
    panels = panels_for(series)
    if not panels:
        raise PlotError(f"{run_dir}/metrics.jsonl has none of the plotted metrics")
    width, height = figure_size(len(panels))
    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    rows = math.ceil(len(panels) / COLUMNS)
    axes = figure.subplots(rows, COLUMNS, squeeze=False).ravel()
    for ax, panel in zip(axes, panels, strict=False):
        _draw(ax, panel, series)
    for ax in axes[len(panels) :]:
        ax.set_axis_off()
    figure.suptitle(f"{run_dir.name}: {_kind(series)}, {len(series.steps)} steps")
    target = run_dir / PNG_NAME
    partial = target.with_suffix(".png.partial")
    figure.savefig(partial, format="png", dpi=DPI)
    os.replace(partial, target)  # a reader never sees half a file
    return target


def _kind(series: Series) -> str:
    return "GRPO" if "reward_mean" in series.names() else "SFT"


def _draw(ax, panel: Panel, series: Series) -> None:
    have = series.names()
    keys = [k for k in panel.keys if k in have]
    if panel.prefix:
        keys += sorted(k for k in have if k.startswith(panel.prefix))
    for key in keys:
        steps, values = series.line(key)
        style = "--" if key.endswith(("_min", "_max")) else "-"
        ax.plot(steps, values, style, label=key, linewidth=1.2)
    if panel.band and set(panel.band) <= have:
        mean, std = panel.band
        steps, means = series.line(mean)
        spread = dict(zip(*series.line(std), strict=True))
        low = [m - spread.get(s, 0.0) for s, m in zip(steps, means, strict=True)]
        high = [m + spread.get(s, 0.0) for s, m in zip(steps, means, strict=True)]
        ax.fill_between(steps, low, high, alpha=0.2, label=f"± {std}")
    for key in panel.validation:
        if key in have:
            steps, values = series.line(key, validation=True)
            ax.plot(steps, values, "o-", label=key, linewidth=1.2, markersize=3)
    ax.set_title(panel.title)
    ax.set_xlabel("step")
    unit = next((METRICS[k].unit for k in keys if k in METRICS), "")
    if unit:
        ax.set_ylabel(unit)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small")
