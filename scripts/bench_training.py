"""Benchmark alignloop's trainers against TRL's, side by side, each in its own process.

    python scripts/bench_training.py rm  --pairs 256 --max-length 256          # RM: ours vs TRL RewardTrainer
    python scripts/bench_training.py ppo --iterations 3 --batch 8                # PPO: ours vs TRL RLOOTrainer vs four models
    python scripts/bench_training.py rm --model /path/to/tiny --pairs 64        # a smoke run on a tiny model
    python scripts/bench_training.py logprobs --rows 256                          # log-probs: written-out vs taped gradient

Reward model: the same HH pairs, the same 80/20 prompt split, LoRA r=16 on the same modules,
the same pairs per step and learning rate; reported: training pairs/s and held-out pairwise accuracy.
Targets: ours >= 1.5x TRL's pairs/s at equal or better accuracy.

PPO: seconds per iteration split into generation / scoring / update, and peak memory
(CUDA max allocated, or the process's peak RSS on CPU), against TRL's RLOOTrainer (a policy
and reference plus a separate reward model) and against four separate copies of the base
(policy, reference, reward, value) loaded and run once. Target: ours <= 0.5x four models.

TRL is for this benchmark only, not a dependency: `pip install trl` where you run it.
Each implementation runs in a fresh subprocess so peak memory is its own; the PPO runs' prompts,
demonstrations and reward adapter are built once beforehand, in a process of their own, so no run's
peak holds the reward model's training and every run scores with the same reward adapter.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "hh_harmless_pairs.jsonl.gz"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n\n")[0])


# --------------------------------------------------------------------------- #
# Shared set-up
# --------------------------------------------------------------------------- #


def _peak_mb(cpu: bool = False) -> float:
    """Peak memory so far in MB: CUDA's allocator when a GPU is present (unless ``cpu``), else this process's RSS."""
    import torch

    if not cpu and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _groups(data: Path, pairs: int, seed: int) -> list:
    """Preference groups of the first ``pairs`` pairs after a seeded shuffle."""
    import random

    from feedback_db import read_jsonl
    from training.chat_data import preference_groups

    rows = list(read_jsonl(data))
    random.Random(seed).shuffle(rows)
    return preference_groups(rows[:pairs] if pairs else rows)


def _split(data: Path, pairs: int, seed: int) -> tuple[list, list]:
    """The 80/20 prompt split both trainers use (the one `train_reward_model` makes with this seed)."""
    from training.chat_data import split_rows

    return split_rows(_groups(data, pairs, seed), 0.2, seed)


def _group_rows(groups: list) -> list[dict]:
    return [{"prompt": g.prompt, "completions": g.completions, "pairs": [list(p) for p in g.pairs]} for g in groups]


def _datasets_without_fingerprints() -> None:
    """Give `datasets` random fingerprints. Where its dill cannot pickle pyarrow's MonthDayNano
    (seen with dill 0.4 / pyarrow 24+), hashing a table fails; fingerprints only name cache files."""
    import datasets.arrow_dataset as arrow_dataset
    import datasets.fingerprint as fingerprint

    def random_fingerprint(*_: Any, **__: Any) -> str:
        return fingerprint.generate_random_fingerprint()

    for module in (fingerprint, arrow_dataset):
        for name in ("update_fingerprint", "generate_fingerprint"):
            if hasattr(module, name):
                setattr(module, name, random_fingerprint)


def _trl_rows(groups: list) -> list[dict]:
    return [{"prompt": g.prompt, "chosen": [{"role": "assistant", "content": g.completions[w]}],
             "rejected": [{"role": "assistant", "content": g.completions[l]}]} for g in groups for w, l in g.pairs]


# --------------------------------------------------------------------------- #
# One implementation, run inside a subprocess
# --------------------------------------------------------------------------- #


def rm_ours(opts: dict[str, Any], work: Path) -> dict[str, Any]:
    from training.config import LoraSettings, RewardConfig
    from training.reward_model import train_reward_model

    groups = _groups(Path(opts["data"]), opts["pairs"], opts["seed"])
    data = work / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _group_rows(groups)))
    # eval_fraction and seed as in _split: the same held-out prompts as TRL's run.
    cfg = RewardConfig(base_model=opts["model"], data=str(data), output_dir=str(work / "rm"), epochs=1.0,
                       groups_per_batch=opts["batch"], micro_batch_groups=opts.get("micro_batch", 0),
                       lr=opts["lr"], max_length=opts["max_length"],
                       eval_fraction=0.2, seed=opts["seed"], progress=False, lora=LoraSettings(r=16, alpha=32))
    r = train_reward_model(cfg)
    return {"impl": "alignloop", "pairs_per_s": r.pairs_per_second, "accuracy": r.eval_accuracy,
            "train_pairs": r.train_pairs, "eval_pairs": r.eval_pairs, "train_s": r.train_seconds, "peak_mb": _peak_mb()}


def rm_trl(opts: dict[str, Any], work: Path) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    from training.base_models import prepare_model

    _datasets_without_fingerprints()

    folder = prepare_model(opts["model"])
    train, held = _split(Path(opts["data"]), opts["pairs"], opts["seed"])
    tok = AutoTokenizer.from_pretrained(folder)
    cuda = torch.cuda.is_available()
    micro = opts.get("micro_batch", 0) or opts["batch"]  # the same pairs per optimizer step, micro-batched alike
    args = RewardConfig(output_dir=str(work / "trl"), per_device_train_batch_size=micro,
                        gradient_accumulation_steps=max(1, opts["batch"] // micro),
                        per_device_eval_batch_size=opts["batch"], num_train_epochs=1, learning_rate=opts["lr"],
                        max_length=opts["max_length"], report_to="none", save_strategy="no", logging_steps=10,
                        use_cpu=not cuda, bf16=cuda, disable_dropout=True,
                        model_init_kwargs={"dtype": torch.bfloat16 if cuda else torch.float32})
    peft_config = LoraConfig(task_type="SEQ_CLS", r=16, lora_alpha=32, target_modules=LORA_TARGETS)
    trainer = RewardTrainer(model=str(folder), args=args, train_dataset=Dataset.from_list(_trl_rows(train)),
                            eval_dataset=Dataset.from_list(_trl_rows(held)), processing_class=tok, peft_config=peft_config)
    started = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - started
    metrics = trainer.evaluate()
    n_train = sum(len(g.pairs) for g in train)
    return {"impl": "trl RewardTrainer", "pairs_per_s": n_train / train_s, "accuracy": metrics.get("eval_accuracy"),
            "train_pairs": n_train, "eval_pairs": sum(len(g.pairs) for g in held), "train_s": train_s,
            "peak_mb": _peak_mb()}


def _bench_prompts(opts: dict[str, Any], work: Path) -> tuple[Path, Path, Path]:
    """Prompts, ptx demonstrations and a reward adapter for a PPO run: those the driver built once for every
    run (``opts["inputs"]``, :func:`_build_ppo_inputs`), else built here."""
    if opts.get("inputs"):
        paths = json.loads((Path(opts["inputs"]) / "inputs.json").read_text())
        return Path(paths["prompts"]), Path(paths["demos"]), Path(paths["reward_adapter"])
    return _build_ppo_inputs(opts, work)


def _build_ppo_inputs(opts: dict[str, Any], work: Path) -> tuple[Path, Path, Path]:
    """Prompts, ptx demonstrations and a (briefly trained) reward adapter for the PPO runs."""
    from training.config import LoraSettings, RewardConfig
    from training.reward_model import train_reward_model

    train, _ = _split(Path(opts["data"]), max(opts["pairs"], 64), opts["seed"])
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": g.prompt}) + "\n" for g in train))
    demos = work / "demos.jsonl"
    demos.write_text("".join(json.dumps({"prompt": g.prompt, "completion": g.completions[g.pairs[0][0]]}) + "\n" for g in train))
    prefs = work / "prefs.jsonl"
    prefs.write_text("".join(json.dumps(r) + "\n" for r in _group_rows(train[:8])))
    rm = train_reward_model(RewardConfig(base_model=opts["model"], data=str(prefs), output_dir=str(work / "rm"),
                                         epochs=1, groups_per_batch=4, max_length=opts["max_length"], eval_fraction=0.0,
                                         progress=False, lora=LoraSettings(r=16, alpha=32)))
    (work / "inputs.json").write_text(json.dumps({"prompts": str(prompts), "demos": str(demos),
                                                  "reward_adapter": str(rm.adapter_dir)}))
    return prompts, demos, rm.adapter_dir


def _ppo_config(opts: dict[str, Any], work: Path, prompts: Path, demos: Path, rm_dir: Path) -> Any:
    """The PPO-ptx run every PPO implementation of this benchmark makes (same data, sizes and seed)."""
    from training.config import LoraSettings, PPOConfig

    return PPOConfig(base_model=opts["model"], prompts=str(prompts), reward_adapter=str(rm_dir), sft_data=str(demos),
                     output_dir=str(work / "ppo"), iterations=opts["iterations"], rollout_batch=opts["batch"],
                     minibatch=min(4, opts["batch"]), ppo_epochs=opts["ppo_epochs"], max_new_tokens=opts["max_new_tokens"],
                     max_length=opts["max_length"], progress=False, lora=LoraSettings(r=16, alpha=32),
                     gradient_checkpointing=opts.get("gradient_checkpointing", False))


def ppo_ours(opts: dict[str, Any], work: Path) -> dict[str, Any]:
    from training.metrics_log import read_metrics
    from training.ppo import train_ppo

    prompts, demos, rm_dir = _bench_prompts(opts, work)
    result = train_ppo(_ppo_config(opts, work, prompts, demos, rm_dir))
    log = [r for r in read_metrics(result.metrics_path) if "reward/mean" in r]
    steady = log[1:] or log  # the first iteration pays one-time warm-up costs
    split = {k: sum(r[f"time/{k}_s"] for r in steady) / len(steady) for k in ("generation", "scoring", "update")}
    return {"impl": "alignloop PPO-ptx", "iteration_s": sum(split.values()), **{f"{k}_s": v for k, v in split.items()},
            "peak_mb": _peak_mb(), "param_mb_shared": result.memory["shared_mb"],
            "param_mb_four_models": result.memory["four_models_mb"], "reward_adapter": str(rm_dir)}


class _FourModelStack:
    """PPO's four roles on four separately loaded copies of the base (the baseline of the memory target).

    Built by :func:`ppo_four_models` and handed to the unchanged ``training.ppo.train_ppo`` in place of
    its one-base stack: each role's method runs the one-base code on that role's own model (``_on``).
    """

    def __init__(self, stack: Any, reference: Any, reward: Any, value: Any) -> None:
        self._stack, self.reference, self.reward, self.value = stack, reference, reward, value
        self.policy = stack.model

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stack, name)

    def _on(self, model: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        self._stack.model = model
        try:
            return getattr(type(self._stack), method)(self._stack, *args, **kwargs)
        finally:
            self._stack.model = self.policy

    def reference_logprobs(self, *args: Any) -> Any:
        return self._on(self.reference, "reference_logprobs", *args)

    def values(self, *args: Any) -> Any:
        return self._on(self.value, "values", *args)

    def scores(self, *args: Any) -> Any:
        return self._on(self.reward, "scores", *args)

    def value_parameters(self) -> list:
        return self._on(self.value, "value_parameters")


def ppo_four_models(opts: dict[str, Any], work: Path) -> dict[str, Any]:
    """The same PPO-ptx run as :func:`ppo_ours` (``train_ppo``, same data and settings), but policy, reference,
    reward and value each live on their own copy of the base: the memory a naive PPO implementation pays."""
    import torch

    import training.ppo as ppo
    from training.adapters import attach_adapter, load_base
    from training.metrics_log import read_metrics

    prompts, demos, rm_dir = _bench_prompts(opts, work)
    cfg = _ppo_config(opts, work, prompts, demos, rm_dir)

    def own_copy(name: str, folder: Path | None, trainable: bool) -> Any:
        base, _, _ = load_base(cfg)
        with torch.no_grad():  # safetensors are memory-mapped: four loads of one file would share its pages
            for param in base.parameters():
                param.data = param.data.clone()
        return attach_adapter(base, name, folder, cfg.lora, trainable=trainable).eval()

    one_base = ppo.build_stack
    stacks: list[_FourModelStack] = []

    def build_four(cfg: Any, with_reward_adapter: bool) -> Any:
        stack = one_base(cfg, with_reward_adapter)  # the policy (and the heads) on the first copy
        for role in ("reference", "reward", "value"):  # the other three copies play these
            if role in stack.model.peft_config:
                stack.model.delete_adapter(role)
        # No SFT adapter in this run: the reference is its copy's base with the (fresh) adapter disabled.
        four = _FourModelStack(stack, own_copy("reference", None, False), own_copy("reward", rm_dir, False),
                               own_copy("value", rm_dir, True))
        stacks.append(four)
        return four

    def four_memory(stack: Any) -> dict[str, float]:
        models = [stack.policy, stack.reference, stack.reward, stack.value]
        mb = sum(p.numel() * p.element_size() for m in models for p in m.parameters()) / 2**20
        return {"shared_mb": mb, "four_models_mb": mb, "ratio": 1.0}

    def save(model: Any, name: str, folder: Any) -> Path:
        owner = stacks[-1].value if name == "value" else model
        return one_save(owner, name, folder)

    one_save = ppo.save_adapter
    ppo.build_stack, ppo.memory_report, ppo.save_adapter = build_four, four_memory, save
    result = ppo.train_ppo(cfg)
    log = [r for r in read_metrics(result.metrics_path) if "reward/mean" in r]
    steady = log[1:] or log
    split = {k: sum(r[f"time/{k}_s"] for r in steady) / len(steady) for k in ("generation", "scoring", "update")}
    return {"impl": "four separate models", "iteration_s": sum(split.values()),
            **{f"{k}_s": v for k, v in split.items()}, "peak_mb": _peak_mb(), "param_mb": result.memory["four_models_mb"],
            "reward_adapter": str(rm_dir)}


def ppo_trl(opts: dict[str, Any], work: Path) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import RLOOConfig, RLOOTrainer

    from training.base_models import prepare_model

    _datasets_without_fingerprints()
    from training.reward_model import RewardModel

    prompts, _, rm_dir = _bench_prompts(opts, work)
    folder = prepare_model(opts["model"])
    rm = RewardModel.load(rm_dir, base_model=opts["model"])

    def reward(prompts: list, completions: list, **_: Any) -> list[float]:
        replies = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return rm.score(prompts, replies)

    rows = [json.loads(line) for line in prompts.read_text().split("\n") if line.strip()]
    cuda = torch.cuda.is_available()
    args = RLOOConfig(output_dir=str(work / "rloo"), per_device_train_batch_size=opts["batch"], num_generations=2,
                      max_completion_length=opts["max_new_tokens"], max_steps=opts["iterations"],
                      num_iterations=opts["ppo_epochs"], learning_rate=1e-5, report_to="none", save_strategy="no",
                      logging_steps=1, use_cpu=not cuda, bf16=cuda, beta=0.05,
                      model_init_kwargs={"dtype": torch.bfloat16 if cuda else torch.float32})
    trainer = RLOOTrainer(model=str(folder), reward_funcs=reward, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=AutoTokenizer.from_pretrained(folder),
                          peft_config=LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, target_modules=LORA_TARGETS))
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    return {"impl": "trl RLOOTrainer", "iteration_s": seconds / opts["iterations"], "peak_mb": _peak_mb()}


def _logprobs_run(opts: dict[str, Any], taped: bool) -> dict[str, Any]:
    """One forward + backward of log-probs and entropies of ``rows`` hidden rows through an LM head of Gemma 3
    270M's shape, at the app's sampling (temperature 0.8, frequency penalty 0.5 over 24 reply tokens, min-p 0.1)."""
    import torch
    from torch import nn

    from training.logprobs import rows_logprobs, taped_rows_logprobs

    torch.manual_seed(opts["seed"])
    head = nn.Linear(opts["hidden"], opts["vocab"], bias=False).requires_grad_(False)
    rows = torch.randn(opts["rows"], opts["hidden"], requires_grad=True)
    targets = torch.randint(0, opts["vocab"], (opts["rows"],))
    history = torch.randint(-1, opts["vocab"], (opts["rows"], 24))
    before = _peak_mb(cpu=True)  # the tensors are on the CPU, whatever else the machine has
    started = time.perf_counter()
    if taped:
        lp, ent = taped_rows_logprobs(rows * 1.0, targets, head, None, 0.8, opts["chunk"], history, 0.5, 0.1)
    else:
        lp, ent = rows_logprobs(rows * 1.0, targets, head, None, 0.8, opts["chunk"], True, history, 0.5, 0.1)
    (lp.sum() + 0.01 * ent.sum()).backward()
    return {"impl": "autograd-taped" if taped else "alignloop SampledLogprobs", "seconds": time.perf_counter() - started,
            "peak_mb": _peak_mb(cpu=True) - before}


RUNNERS = {("rm", "ours"): rm_ours, ("rm", "trl"): rm_trl, ("ppo", "ours"): ppo_ours, ("ppo", "trl"): ppo_trl,
           ("ppo", "four-models"): ppo_four_models,
           ("logprobs", "ours"): lambda opts, work: _logprobs_run(opts, taped=False),
           ("logprobs", "taped"): lambda opts, work: _logprobs_run(opts, taped=True)}


# --------------------------------------------------------------------------- #
# The driver: one subprocess per implementation, then a table
# --------------------------------------------------------------------------- #


def _run_isolated(kind: str, impl: str, opts: dict[str, Any]) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "one", kind, impl, json.dumps(opts)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=os.environ.copy())
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (proc.stderr or proc.stdout)[-1500:]
    if "No module named 'trl'" in tail or "No module named 'datasets'" in tail:
        return {"impl": impl, "skipped": "trl is not installed here (pip install trl; benchmark only)"}
    return {"impl": impl, "error": tail}


def _table(kind: str, results: list[dict[str, Any]]) -> str:
    keys = {"rm": ["pairs_per_s", "accuracy", "train_pairs", "eval_pairs", "train_s", "peak_mb"],
            "logprobs": ["seconds", "peak_mb"]}.get(kind) or \
        ["iteration_s", "generation_s", "scoring_s", "update_s", "peak_mb", "net_peak_mb", "param_mb_shared", "param_mb_four_models", "param_mb"]
    lines = ["| impl | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for r in results:
        cells = [f"{r[k]:.3f}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys]
        lines.append(f"| {r['impl']} | " + " | ".join(cells) + " |")
        if "error" in r or "skipped" in r:
            lines.append(f"|  | {(r.get('skipped') or r['error']).splitlines()[-1][:200]} |")
    return "\n".join(lines)


def _summary(kind: str, results: list[dict[str, Any]]) -> str:
    by = {r["impl"]: r for r in results}
    if kind == "rm":
        ours, trl = by.get("alignloop"), by.get("trl RewardTrainer")
        if ours and trl and "pairs_per_s" in trl:
            return (f"RM throughput {ours['pairs_per_s'] / trl['pairs_per_s']:.2f}x TRL (target >= 1.5x), accuracy "
                    f"{ours['accuracy']:.3f} vs {trl['accuracy']:.3f}")
    elif kind == "logprobs":
        ours, taped = by.get("alignloop SampledLogprobs"), by.get("autograd-taped")
        if ours and taped and ours.get("peak_mb") is not None and taped.get("peak_mb") and taped.get("seconds"):
            return (f"log-probs forward + backward: peak {ours['peak_mb']:.0f} MB vs {taped['peak_mb']:.0f} MB taped "
                    f"({ours['peak_mb'] / taped['peak_mb']:.2f}x), time {ours['seconds'] / taped['seconds']:.2f}x")
    else:
        ours, four = by.get("alignloop PPO-ptx"), by.get("four separate models")
        if ours and four and "net_peak_mb" in four and "net_peak_mb" in ours:
            return (f"PPO peak memory (net of the Python/torch runtime) {ours['net_peak_mb']:.0f} MB vs four models "
                    f"{four['net_peak_mb']:.0f} MB: {ours['net_peak_mb'] / four['net_peak_mb']:.2f}x (target <= 0.5x); parameters "
                    f"{ours['param_mb_shared']:.0f} MB vs {ours['param_mb_four_models']:.0f} MB")
    return ""


def _ratio(kind: str, a: dict[str, Any], b: dict[str, Any]) -> float | None:
    """The headline ratio of one A/B pair: RM pairs/s ours over TRL's; PPO peak memory ours over four models."""
    key = {"rm": "pairs_per_s", "logprobs": "peak_mb"}.get(kind, "net_peak_mb")
    if a.get(key) and b.get(key):
        return a[key] / b[key]
    return None


def _interleaved_summary(kind: str, impls: list[str], rounds: list[list[dict[str, Any]]]) -> str:
    """Median and range of the per-pair ratio of the first two implementations, each pair run back to back."""
    ratios = [r for pair in rounds if len(pair) >= 2 and (r := _ratio(kind, pair[0], pair[1])) is not None]
    if not ratios:
        return ""
    what = {"rm": "RM pairs/s, ours / TRL", "logprobs": "log-probs peak memory, ours / taped"}.get(
        kind, "PPO net peak memory, ours / four models")
    line = (f"{what}: median {statistics.median(ratios):.2f}x over {len(ratios)} interleaved pairs "
            f"(range {min(ratios):.2f}-{max(ratios):.2f}; each: {', '.join(f'{r:.2f}' for r in ratios)})")
    if kind == "rm":
        accs = [(pair[0].get("accuracy"), pair[1].get("accuracy")) for pair in rounds if len(pair) >= 2]
        line += "; held-out accuracy per pair (ours, TRL): " + ", ".join(
            f"({a:.3f}, {b:.3f})" for a, b in accs if isinstance(a, float) and isinstance(b, float))
    if kind == "logprobs":
        times = [pair[0]["seconds"] / pair[1]["seconds"] for pair in rounds
                 if len(pair) >= 2 and pair[0].get("seconds") and pair[1].get("seconds")]
        if times:
            line += (f"; time, ours / taped: median {statistics.median(times):.2f}x "
                     f"(range {min(times):.2f}-{max(times):.2f})")
    return line


def _bench(kind: str, impls: list[str], opts: dict[str, Any], out: Path | None, repeats: int = 1) -> None:
    """Run the implementations A B (C) A B (C) ... ``repeats`` times, each in a fresh process, so that a
    noisy shared machine slows both sides of a pair alike; report every run and the per-pair ratios.

    PPO: the prompts, demonstrations and reward adapter every run needs are built first, once, in a
    process of their own, so that no run's peak memory holds the reward model's training."""
    if kind == "ppo" and not opts.get("inputs"):
        with tempfile.TemporaryDirectory(prefix="bench-ppo-inputs-") as folder:
            typer.echo("building the PPO runs' prompts, demonstrations and reward adapter (own process) ...", err=True)
            built = subprocess.run([sys.executable, __file__, "inputs", json.dumps(opts), folder], cwd=ROOT,
                                   capture_output=True, text=True, env=os.environ.copy())
            if built.returncode != 0:
                raise SystemExit(f"Could not build the PPO inputs:\n{(built.stderr or built.stdout)[-2000:]}")
            _bench(kind, impls, {**opts, "inputs": folder}, out, repeats)
        return
    results, rounds = [], []
    for repeat in range(repeats):
        pair = []
        for impl in impls:
            typer.echo(f"[{repeat + 1}/{repeats}] running {kind} / {impl} ...", err=True)
            started = time.perf_counter()
            result = _run_isolated(kind, impl, opts)
            result["wall_s"] = time.perf_counter() - started
            result["repeat"] = repeat + 1
            results.append(result)
            pair.append(result)
            # Each run as it ends: a benchmark stopped halfway (or killed) keeps what it measured.
            typer.echo(_table(kind, [result]).splitlines()[-1], err=True)
            if out:
                _write_results(out, kind, opts, results)
        rounds.append(pair)
    report = _table(kind, results) + "\n\n" + _summary(kind, results)
    if repeats > 1:
        report += "\n" + _interleaved_summary(kind, impls, rounds)
    typer.echo(report)


def _write_results(out: Path, kind: str, opts: dict[str, Any], results: list[dict[str, Any]]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    options = {k: v for k, v in opts.items() if k != "inputs"}  # a temporary folder, gone after the run
    out.write_text(json.dumps({"kind": kind, "options": options, "results": results}, indent=2) + "\n")


@app.command()
def rm(
    model: Annotated[str, typer.Option(help="Base model ('default': embedded Gemma 3 270M).")] = "default",
    data: Annotated[Path, typer.Option(help="Preference pairs (.jsonl[.gz]).")] = DEFAULT_DATA,
    pairs: Annotated[int, typer.Option(help="Pairs to use (after a seeded shuffle); 0: all.")] = 256,
    max_length: int = 256,
    batch: Annotated[int, typer.Option(help="Pairs (prompts) per step, both trainers.")] = 8,
    lr: float = 1e-4,
    micro_batch: Annotated[int, typer.Option(help="Pairs per forward/backward (gradient accumulation), both trainers; 0: the whole batch.")] = 0,
    impl: Annotated[list[str], typer.Option(help="ours, trl (repeatable).")] = ["ours", "trl"],  # noqa: B006
    out: Annotated[Path | None, typer.Option(help="Write the results as JSON here.")] = None,
    seed: int = 0,
    repeats: Annotated[int, typer.Option(help="Interleaved rounds (ours, TRL, ours, TRL, ...); >= 3 on a shared machine.")] = 3,
) -> None:
    """Reward model: pairs/s and held-out accuracy, ours vs TRL's RewardTrainer, interleaved."""
    _bench("rm", impl, {"model": model, "data": str(data), "pairs": pairs, "max_length": max_length, "batch": batch,
                        "lr": lr, "micro_batch": micro_batch, "seed": seed}, out, repeats)


@app.command()
def ppo(
    model: Annotated[str, typer.Option(help="Base model ('default': embedded Gemma 3 270M).")] = "default",
    data: Annotated[Path, typer.Option(help="Pairs whose prompts are used.")] = DEFAULT_DATA,
    pairs: int = 64,
    iterations: int = 3,
    batch: Annotated[int, typer.Option(help="Prompts per iteration.")] = 8,
    ppo_epochs: int = 2,
    max_new_tokens: int = 32,
    max_length: int = 256,
    impl: Annotated[list[str], typer.Option(help="ours, trl, four-models (repeatable).")] = ["ours", "four-models", "trl"],  # noqa: B006
    out: Annotated[Path | None, typer.Option(help="Write the results as JSON here.")] = None,
    seed: int = 0,
    repeats: Annotated[int, typer.Option(help="Interleaved rounds of the implementations; >= 3 on a shared machine.")] = 1,
    gradient_checkpointing: Annotated[bool, typer.Option(
        help="PPOConfig.gradient_checkpointing in ours and four-models alike (the same PPO step).")] = False,
) -> None:
    """PPO: iteration time (generation / scoring / update) and peak memory vs TRL RLOO and four models."""
    _bench("ppo", impl, {"model": model, "data": str(data), "pairs": pairs, "iterations": iterations, "batch": batch,
                         "ppo_epochs": ppo_epochs, "max_new_tokens": max_new_tokens, "max_length": max_length,
                         "seed": seed, "gradient_checkpointing": gradient_checkpointing}, out, repeats)


@app.command()
def logprobs(
    rows: Annotated[int, typer.Option(help="Hidden rows scored (a PPO minibatch: 4 replies x 64 tokens).")] = 256,
    chunk: Annotated[int, typer.Option(help="Rows projected to the vocabulary at once (PPOConfig.logits_chunk).")] = 128,
    hidden: int = 640,
    vocab: Annotated[int, typer.Option(help="LM head shape: Gemma 3 270M's by default.")] = 262144,
    impl: Annotated[list[str], typer.Option(help="ours, taped (repeatable).")] = ["ours", "taped"],  # noqa: B006
    out: Annotated[Path | None, typer.Option(help="Write the results as JSON here.")] = None,
    seed: int = 0,
    repeats: Annotated[int, typer.Option(help="Interleaved rounds (ours, taped, ...); >= 3 on a shared machine.")] = 3,
) -> None:
    """Log-probs and entropies at the app's sampling, forward + backward: peak memory and time of the written-out
    gradient (training.logprobs.SampledLogprobs) vs the same math taped by autograd, interleaved."""
    _bench("logprobs", impl, {"rows": rows, "chunk": chunk, "hidden": hidden, "vocab": vocab, "seed": seed}, out, repeats)


@app.command(hidden=True)
def inputs(opts_json: str, folder: Path) -> None:
    """Build the PPO runs' prompts, demonstrations and reward adapter into FOLDER (``inputs.json``)."""
    _build_ppo_inputs(json.loads(opts_json), folder)


@app.command(hidden=True)
def one(kind: str, impl: str, opts_json: str) -> None:
    """Run one implementation in this process and print its result as one JSON line."""
    opts = json.loads(opts_json)
    import peft  # noqa: F401 - the runtime every implementation pays for, before any model
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    runtime_mb = _peak_mb()
    with tempfile.TemporaryDirectory(prefix=f"bench-{kind}-{impl}-") as work:
        result = RUNNERS[(kind, impl)](opts, Path(work))
    # On CPU the peak RSS includes ~0.4 GB of Python + torch; models and activations are the rest.
    result["net_peak_mb"] = result["peak_mb"] - (0.0 if _on_cuda() else runtime_mb)
    print(json.dumps(result), flush=True)


def _on_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    app()
