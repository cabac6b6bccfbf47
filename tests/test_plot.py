"""`python -m gantry plot RUN_DIR`: run.png from metrics.jsonl, read back as an image."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from gantry.watch.plot import PlotError, figure_size, panels_for, plot_run, read_metrics

ROOT = Path(__file__).resolve().parents[1]


def grpo_record(step: int) -> dict:
    """A record shaped like controller/grpo.py's, with the keys the metrics table adds."""
    return {
        "step": step, "reward_mean": 0.1 * step, "reward_std": 0.05, "reward_min": 0.0,
        "reward_max": 1.0, "reward/accuracy": 0.1 * step, "samples_per_s": 400.0,
        "staleness_mean": 0.5, "staleness_max": 1, "staleness_hist": [2, 2],
        "dropped_stale": 0, "elapsed_s": 2.0 * step, "loss": 0.1, "kl_ref": 0.0,
        "kl_behaviour": 1e-4, "ratio_mean": 1.0, "clip_fraction": 0.0, "grad_norm": 0.5,
        "lr": 1e-3, "tokens": 512.0, "policy_seconds": 1.0, "completion_len_mean": 4.0,
        "entropy": 2.0, "policy_idle_fraction": 0.3, "rollout_idle_fraction": 0.1,
        "prompt_ids": ["0:1", "0:2"],
    }  # fmt: skip


def write_metrics(run_dir: Path, records: list[dict]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_a_grpo_run_plots_every_panel_it_has_keys_for(tmp_path):
    write_metrics(tmp_path, [grpo_record(s) for s in range(1, 11)])
    titles = [p.title for p in panels_for(read_metrics(tmp_path))]
    assert titles[:7] == [
        "reward", "loss", "KL", "completion length", "entropy", "staleness", "idle fraction",
    ]  # fmt: skip
    assert "padding fraction" not in titles  # no key of it: skipped
    path = plot_run(tmp_path)
    assert path == tmp_path / "run.png"
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == figure_size(len(titles))
        pixels = image.convert("L")
        assert pixels.getextrema()[0] < 100  # lines were drawn, not a blank canvas
    assert not list(tmp_path.glob("*.partial"))


def test_an_sft_run_plots_loss_validation_and_throughput(tmp_path):
    records = [
        {"step": s, "epoch": 0, "loss": 2.0 / s, "grad_norm": 1.0, "lr": 1e-4, "tokens": 900.0,
         "assistant_tokens": 300.0, "tokens_per_s": 1000.0 + s, "policy_seconds": 0.9,
         "truncated_samples": 0.0, "elapsed_s": float(s)}
        for s in range(1, 6)
    ]  # fmt: skip
    records.insert(0, {"validation": True, "step": 0, "val_loss": 2.5, "val_tokens": 10.0,
                       "val_samples": 2.0, "val_seconds": 0.1})  # fmt: skip
    records.append({"validation": True, "step": 5, "val_loss": 1.5, "val_tokens": 10.0,
                    "val_samples": 2.0, "val_seconds": 0.1})  # fmt: skip
    write_metrics(tmp_path, records)
    series = read_metrics(tmp_path)
    assert series.line("val_loss", validation=True) == ([0, 5], [2.5, 1.5])
    assert series.line("loss")[0] == [1, 2, 3, 4, 5]  # validations are not steps
    titles = [p.title for p in panels_for(series)]
    assert titles == ["loss", "tokens/s", "grad norm", "learning rate"]
    with Image.open(plot_run(tmp_path)) as image:
        assert image.size == figure_size(4)


def test_a_resumed_run_keeps_the_last_record_of_a_step(tmp_path):
    first = [grpo_record(s) for s in (1, 2, 3)]
    again = {**grpo_record(3), "reward_mean": 9.0}  # the attempt after a restart
    write_metrics(tmp_path, [*first, again, grpo_record(4)])
    steps, rewards = read_metrics(tmp_path).line("reward_mean")
    assert steps == [1, 2, 3, 4] and rewards[2] == 9.0


def test_no_metrics_is_one_clear_line(tmp_path):
    with pytest.raises(PlotError, match="no metrics.jsonl in"):
        plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(PlotError, match="holds no step yet"):
        plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("{not json\n")
    with pytest.raises(PlotError, match=r"metrics.jsonl:1 is not a JSON record"):
        plot_run(tmp_path)


def test_the_command_writes_run_png_or_says_why_not(tmp_path):
    missing = subprocess.run(
        [sys.executable, "-m", "gantry", "plot", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert missing.returncode == 1
    assert (
        missing.stderr.startswith("gantry plot: no metrics.jsonl")
        and missing.stderr.count("\n") == 1
    )
    write_metrics(tmp_path, [grpo_record(s) for s in range(1, 4)])
    done = subprocess.run(
        [sys.executable, "-m", "gantry", "plot", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / "run.png")
    assert (tmp_path / "run.png").stat().st_size > 10_000


def test_importing_the_plot_module_does_not_import_matplotlib():
    code = "import sys, gantry.watch.plot; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_every_panel_key_is_a_defined_metric():
    """A panel naming a key no step record has would silently never be drawn."""
    from gantry.comm.metrics import METRICS
    from gantry.watch.plot import PANELS

    named = {k for p in PANELS for k in (*p.keys, *(p.band or ()), *(p.validation or ()))}
    assert sorted(named - set(METRICS)) == []
