"""The GPU code paths, end to end, on a machine with CUDA: one whole round (SFT -> reward model -> PPO-ptx
-> gates) on the starter set with every step on `cuda` in bfloat16, then the transformers engine
serving the round's policy adapter on the GPU.

    python scripts/gpu_check.py --out runs/gpu-check                 # a tiny random model (no download)
    python scripts/gpu_check.py --out runs/gpu-check --model default # the embedded Gemma 3 270M

It prints the round's status, gates and time per step, and the engine's replies with their speed.
    python scripts/gpu_check.py --out runs/gpu-4bit --model default --load-in-4bit   # QLoRA: a 4-bit NF4 base

What it does not cover: vLLM on GPU, a package the machine may not have; it says so when vLLM or
bitsandbytes (needed by --load-in-4bit) do not import.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.round import run_round  # noqa: E402
from training.round_config import RoundConfig  # noqa: E402

TINY_OVERRIDES = {"heldout_fraction": 0.3, "min_pairs": 4, "min_prompts": 3, "eval_prompts": 8, "min_eval_prompts": 4,
                  "min_rm_eval_pairs": 4}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/gpu-check", help="A fresh folder for the database, the round and results.json.")
    parser.add_argument("--model", default="tiny", help="'tiny' (a tiny random model built here) or a base model ('default', a folder).")
    parser.add_argument("--ppo-iterations", type=int, default=8, help="PPO iterations of the round.")
    parser.add_argument("--load-in-4bit", action="store_true", help="QLoRA: the frozen base in 4 bits (bitsandbytes NF4) in every step.")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        raise SystemExit("No CUDA device: this script checks the GPU paths; run it on a GPU machine.")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model == "tiny":
        from training.base_models import build_tiny_model
        model = str(build_tiny_model(out / "tiny-model"))
    results: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "model": args.model,
                     "load_in_4bit": args.load_in_4bit}
    for optional in ("vllm", "bitsandbytes"):
        try:
            importlib.import_module(optional)
            results[optional] = "imports"
        except Exception as exc:  # noqa: BLE001 - report any import failure
            results[optional] = f"not available here ({type(exc).__name__})"

    config = RoundConfig(db=str(out / "feedback.db"), base_model=model, rounds_dir=str(out / "rounds"), device="cuda")
    for step in (config.sft, config.reward, config.ppo):
        step.dtype = "bfloat16"
        step.load_in_4bit = args.load_in_4bit
    config.ppo.iterations = args.ppo_iterations
    config.ppo.sampler = "hf"
    if args.model == "tiny":
        for key, value in TINY_OVERRIDES.items():
            setattr(config, key, value)
    t0 = time.perf_counter()
    result = run_round(config, seed_starter=True)
    results["round"] = {"status": result.status, "reason": result.reason, "seconds": round(time.perf_counter() - t0, 1),
                        "step_seconds": result.metrics.get("step_seconds"), "candidate": result.candidate,
                        "gates": {k: v.get("verdict") for k, v in (result.metrics.get("gates") or {}).items()
                                  if isinstance(v, dict)}}
    results["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    results["report"] = str(result.report_path) if result.report_path else None
    policy = next(iter(sorted((out / "rounds").glob("round-*/adapters/policy-*"))), None)
    print(json.dumps(results, indent=2, default=str), flush=True)
    if policy is not None:
        results["engine"] = asyncio.run(_serve(model, policy))
    print(json.dumps(results, indent=2, default=str))
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    return 0


async def _serve(model: str, policy: Path) -> dict:
    """The transformers engine on the GPU serving the round's policy: replies and tokens/s."""
    from chat_app.engines import EngineConfig, SamplingConfig, create_engine
    from chat_app.engines.base import AdapterRef
    from training.base_models import prepare_model

    engine = create_engine("hf", Path(prepare_model(model)), EngineConfig(device="cuda", dtype="bfloat16", max_model_len=1024))
    try:
        await engine.add_adapter(AdapterRef("policy", policy))
        chat = [{"role": "user", "content": "Give me two tips for sleeping better."}]
        t = time.perf_counter()
        replies = await engine.generate(chat, 4, adapter="policy", sampling=SamplingConfig(max_tokens=64))
        seconds = time.perf_counter() - t
        tokens = sum(r.completion_tokens for r in replies)
        return {"replies": [r.text[:200] for r in replies], "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1)}
    finally:
        await engine.close()


if __name__ == "__main__":
    raise SystemExit(main())
