"""The training scripts an operator runs by hand: scripts/train_real_run.py end to end on the tiny model (a
reward model, then PPO-ptx, with the held-out accuracy's interval), and bench_training's interleaved
summary on hand-made results."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from feedback_db.analytics import wilson_interval
from scripts import bench_training, train_real_run


def _hh_pairs(path: Path, n: int) -> Path:
    rows = [{"prompt": f"\n\nHuman: question number {i}?\n\nAssistant:", "chosen": f" A kind answer {i}.",
             "rejected": f" go away {i}"} for i in range(n)]
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def test_train_real_run_reports_the_reward_models_held_out_accuracy_with_its_interval(tiny_model_path, tmp_path):
    out = tmp_path / "run"
    train_real_run.main(out=out, data=_hh_pairs(tmp_path / "pairs.jsonl.gz", 30), base_model=str(tiny_model_path),
                        pairs=0, max_length=48, rm_batch=4, rm_micro_batch=2, ppo_iterations=1, ppo_batch=2,
                        max_new_tokens=4, ppo_max_length=48, ptx_max_length=32, ppo_epochs=1, seed=0)
    report = json.loads((out / "report.json").read_text())
    rm = report["reward_model"]
    assert report["pairs"] == 30 and rm["held_out_pairs"] > 0 and rm["train_pairs"] + rm["held_out_pairs"] == 30
    low, high = rm["held_out_accuracy_95ci"]
    correct = round(rm["held_out_accuracy"] * rm["held_out_pairs"])
    assert [low, high] == list(wilson_interval(correct, rm["held_out_pairs"]))
    assert low <= rm["held_out_accuracy"] <= high and high - low > 0.1  # a handful of pairs: a wide interval
    assert report["ppo"]["iterations"] == 1 and Path(report["ppo"]["adapter"]).is_dir()
    assert "held_out_accuracy" in (out / "report.md").read_text()


def test_bench_training_summarises_interleaved_pairs_by_their_median_ratio_and_range():
    def run(impl: str, pairs_per_s: float, accuracy: float) -> dict:
        return {"impl": impl, "pairs_per_s": pairs_per_s, "accuracy": accuracy}

    rounds = [[run("ours", 3.0, 0.6), run("trl", 2.0, 0.5)],   # 1.50x
              [run("ours", 2.0, 0.6), run("trl", 2.0, 0.55)],  # 1.00x: a slow moment for ours
              [run("ours", 4.0, 0.7), run("trl", 2.0, 0.5)],   # 2.00x
              [run("ours", 1.0, 0.6), {"impl": "trl", "error": "killed"}]]  # no pair: left out
    line = bench_training._interleaved_summary("rm", ["ours", "trl"], rounds)
    assert "median 1.50x over 3 interleaved pairs (range 1.00-2.00; each: 1.50, 1.00, 2.00)" in line
    assert "(0.600, 0.500), (0.600, 0.550), (0.700, 0.500)" in line
    memory = [[{"net_peak_mb": 1000.0}, {"net_peak_mb": 4000.0}], [{"net_peak_mb": 1200.0}, {"net_peak_mb": 4000.0}]]
    assert "PPO net peak memory, ours / four models: median 0.28x over 2 interleaved pairs" in \
        bench_training._interleaved_summary("ppo", ["ours", "four-models"], memory)


def test_bench_training_keeps_each_finished_run_when_stopped_halfway(tmp_path, monkeypatch):
    """Runs are written as they end: a benchmark killed in its third run keeps the first two."""
    finished = iter([{"impl": "alignloop", "pairs_per_s": 1.2}, {"impl": "trl RewardTrainer", "pairs_per_s": 1.0}])

    def run(kind, impl, opts):
        try:
            return dict(next(finished))
        except StopIteration:
            raise KeyboardInterrupt from None  # the operator (or the OOM killer) stops it here

    monkeypatch.setattr(bench_training, "_run_isolated", run)
    out = tmp_path / "rm.json"
    try:
        bench_training._bench("rm", ["ours", "trl"], {"pairs": 8}, out, repeats=3)
    except KeyboardInterrupt:
        pass
    saved = json.loads(out.read_text())
    assert [r["pairs_per_s"] for r in saved["results"]] == [1.2, 1.0] and saved["options"] == {"pairs": 8}


def test_bench_training_ppo_runs_both_implementations_on_one_reward_adapter_built_apart(tiny_model_path, tmp_path):
    """The PPO benchmark on the tiny model: ours and four separate models each run in their own process, on the
    reward adapter built once beforehand (in a process of its own: no run's peak memory holds its training)."""
    import subprocess
    import sys

    rows = [{"prompt": f"Question {i}: what is {i} plus {i}?", "chosen": f"It is {2 * i}.", "rejected": "No idea."}
            for i in range(16)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "ppo.json"
    done = subprocess.run([sys.executable, str(Path(bench_training.__file__)), "ppo", "--model", str(tiny_model_path),
                           "--data", str(data), "--pairs", "16", "--iterations", "2", "--batch", "2",
                           "--ppo-epochs", "1", "--max-new-tokens", "4", "--max-length", "64",
                           "--impl", "ours", "--impl", "four-models", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.loads(out.read_text())
    ours, four = saved["results"]
    assert "error" not in ours and "error" not in four, saved["results"]
    assert ours["impl"] == "alignloop PPO-ptx" and four["impl"] == "four separate models"
    assert ours["reward_adapter"] == four["reward_adapter"] and "inputs" not in saved["options"]
    assert ours["peak_mb"] > 0 and four["peak_mb"] > 0 and ours["param_mb_shared"] < ours["param_mb_four_models"]
    assert "PPO peak memory" in done.stdout


def test_bench_training_logprobs_compares_the_written_out_gradient_with_the_taped_one(tmp_path):
    """The log-probs benchmark on a small head: both implementations run, each in its own process, and the
    interleaved summary gives the memory and time ratios."""
    import subprocess
    import sys

    out = tmp_path / "logprobs.json"
    done = subprocess.run([sys.executable, str(Path(bench_training.__file__)), "logprobs", "--vocab", "3000",
                           "--rows", "40", "--chunk", "16", "--repeats", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ours, taped = json.loads(out.read_text())["results"]
    assert (ours["impl"], taped["impl"]) == ("alignloop SampledLogprobs", "autograd-taped")
    assert ours["seconds"] > 0 and taped["seconds"] > 0 and ours["peak_mb"] >= 0
    assert "log-probs forward + backward: peak" in done.stdout
