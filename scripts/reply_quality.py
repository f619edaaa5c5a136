"""What a first visitor sees: loops, replies cut off at the token limit, and length, on the starter set's
20 evaluation prompts (training/starter/eval_prompts.jsonl: in no training file), for the bare base
and for policy adapters, served by the transformers engine as the app serves them.

    python scripts/reply_quality.py --adapter round0=PATH/policy-r1 --out runs/quality.json
    python scripts/reply_quality.py --adapter round0=PATH --frequency-penalty 0.5 --temperature 0

Each model answers every prompt once (greedy by default, so the figures are reproducible); a reply is
in a loop when one sentence or one run of six words comes three times (training.evaluation.
is_repetition_loop), and it ended with EOS when the model stopped before --max-tokens. Prints a table
and example replies; --out writes everything as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.evaluation import is_repetition_loop, reply_quality  # noqa: E402

EVAL_PROMPTS = ROOT / "training" / "starter" / "eval_prompts.jsonl"


async def answer_all(model_path: Path, adapters: dict[str, str | None], prompts: list[str], sampling) -> dict:
    from chat_app.engines import EngineConfig, create_engine
    from chat_app.engines.base import AdapterRef

    engine = create_engine("hf", model_path, EngineConfig(max_model_len=1024))
    results: dict = {}
    try:
        for name, folder in adapters.items():
            if folder:
                await engine.add_adapter(AdapterRef(name, Path(folder)))
            started = time.perf_counter()
            replies = []
            for prompt in prompts:
                (c,) = await engine.generate([{"role": "user", "content": prompt}], 1,
                                             adapter=name if folder else None, sampling=sampling)
                replies.append({"prompt": prompt, "text": c.text, "finish_reason": c.finish_reason,
                                "tokens": c.completion_tokens, "loop": is_repetition_loop(c.text)})
            quality = reply_quality([r["text"] for r in replies], [r["finish_reason"] == "stop" for r in replies])
            results[name] = {"adapter": folder, "quality": quality.as_dict(), "seconds": time.perf_counter() - started,
                             "replies": replies}
            print(f"{name}: loops {quality.loop_share:.0%}, ended with EOS {quality.eos_share:.0%}, "
                  f"{quality.proper}/{quality.replies} ended without a loop, "
                  f"mean {quality.mean_words:.1f} words ({results[name]['seconds']:.0f} s)", flush=True)
    finally:
        await engine.close()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-model", default="default", help="Base model ('default': embedded Gemma 3 270M).")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                        help="A policy adapter to measure besides the bare base (repeatable).")
    parser.add_argument("--max-tokens", type=int, default=128, help="Longest reply (a reply that reaches it did not end with EOS).")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy.")
    parser.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling (with --temperature > 0; the app serves 0.95).")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL penalty, prompt included (1: none).")
    parser.add_argument("--frequency-penalty", type=float, default=0.0,
                        help="OpenAI's frequency penalty on the reply's own tokens (0: none; the app serves 0.5).")
    parser.add_argument("--presence-penalty", type=float, default=0.0,
                        help="OpenAI's presence penalty on the reply's own tokens (0: none).")
    parser.add_argument("--min-p", type=float, default=0.0,
                        help="Min-p sampling (with --temperature > 0; 0: off; the app serves 0.1).")
    parser.add_argument("--seed", type=int, default=0, help="Sampling seed (with --temperature > 0).")
    parser.add_argument("--no-base", action="store_true", help="Measure only the adapters, not the bare base.")
    parser.add_argument("--examples", type=int, default=3, help="Example replies printed per model.")
    parser.add_argument("--out", type=Path, default=None, help="Write the figures and every reply here (JSON).")
    args = parser.parse_args()

    from chat_app.engines.base import SamplingConfig
    from training.base_models import prepare_model

    prompts = [json.loads(line)["prompt"] for line in EVAL_PROMPTS.read_text().split("\n") if line.strip()]
    adapters: dict[str, str | None] = {} if args.no_base else {"base": None}
    for item in args.adapter:
        name, _, path = item.partition("=")
        if not path or not Path(path, "adapter_config.json").is_file():
            parser.error(f"--adapter {item!r}: give NAME=PATH to a LoRA adapter folder (with adapter_config.json).")
        adapters[name] = path
    if not adapters:
        parser.error("--no-base needs at least one --adapter.")
    sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed,
                              repetition_penalty=args.repetition_penalty, frequency_penalty=args.frequency_penalty,
                              presence_penalty=args.presence_penalty, min_p=args.min_p)
    results = asyncio.run(answer_all(Path(prepare_model(args.base_model)), adapters, prompts, sampling))

    print("\n| model | loops | ended with EOS | ended, no loop | stray text | mean words |\n|---|---|---|---|---|---|")
    for name, r in results.items():
        q = r["quality"]
        print(f"| {name} | {q['loop_share']:.0%} | {q['eos_share']:.0%} | {q['proper']}/{q['replies']} | "
              f"{q['stray']}/{q['replies']} | {q['mean_words']:.1f} |")
    for name, r in results.items():
        print(f"\n{name}:")
        for reply in r["replies"][:args.examples]:
            print(f"  {reply['prompt']}\n    -> {reply['text'][:300]!r} ({reply['finish_reason']})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"sampling": sampling.as_dict(), "prompts": len(prompts), "models": results},
                                       indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
