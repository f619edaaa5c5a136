"""Gold win rates of saved policy adapters on bench_loop's held-out prompts, offline (no app, no users).

    python scripts/judge_adapters.py round0=runs/bench/rounds/round-0001/adapters/policy-r1 \\
        r1=runs/bench/rounds/round-0002/adapters/policy-r2 sft1=runs/bench/rounds/round-0002/adapters/sft-r2
    python scripts/judge_adapters.py base=base round0=runs/bench/rounds/round-0001/adapters/policy-r1 --eval-sampling greedy

The first NAME=PATH is the baseline (PATH ``base``: the bare base model); every other version is judged
against it exactly as bench_loop's step 5 judges a round's candidate: the same held-out prompts (never
sent by a simulated user, none from the starter set), replies drawn the same way (--eval-sampling app:
the app's sampling, --eval-samples per prompt, one seeded random stream for every version; or greedy),
the gold's win rate over decisive pairs, reply i against reply i, with a bootstrap over prompts. Use it
to re-judge a run's adapters after the run, e.g. a round's SFT adapter against its PPO policy, to tell
which step moved the gold. With the rule gold (a), each version's mean rule components are printed too.
--json writes the figures and the replies.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.bench_loop import (  # noqa: E402
    BenchLoopConfig,
    Evaluator,
    add_config_options,
    gold_prompt_split,
    gold_win_rate,
    load_gold,
)
from scripts.gold_preferences import rule_components, rule_gold  # noqa: E402

EVAL_FIELDS = ("gold", "base_model", "device", "eval_prompts", "eval_fraction", "eval_max_new_tokens",
               "eval_sampling", "eval_samples")


def parse_versions(specs: list[str]) -> dict[str, str | None]:
    """NAME=PATH pairs in order; PATH 'base' is the bare base model (None)."""
    versions: dict[str, str | None] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"versions are NAME=PATH (PATH 'base' for the bare base model), not {spec!r}.")
        if name in versions:
            raise SystemExit(f"version {name!r} is named twice.")
        if path != "base" and not (Path(path) / "adapter_config.json").is_file():
            raise SystemExit(f"{path} is not a saved adapter (no adapter_config.json): give a policy-rN folder "
                             "from a round's adapters/, or 'base'.")
        versions[name] = None if path == "base" else path
    if len(versions) < 2:
        raise SystemExit("give a baseline and at least one version to judge against it.")
    return versions


def judge(cfg: BenchLoopConfig, versions: dict[str, str | None]) -> dict[str, object]:
    """Each version after the first against the first: gold win rate (and interval), mean gold, and with the
    rule gold the mean of each rule component."""
    gold = load_gold(cfg.gold)
    _, prompts = gold_prompt_split(cfg, gold)
    evaluator = Evaluator(cfg, gold, prompts)
    started = time.monotonic()
    evaluator.ensure(versions)
    names = list(versions)
    results: dict[str, object] = {"baseline": names[0], "prompts": len(prompts), "sampling": evaluator.sampling.describe(),
                                  "seconds": round(time.monotonic() - started, 1), "versions": {}}
    for name in names:
        row: dict[str, object] = {"mean_gold": evaluator.mean_gold(name)}
        if name != names[0]:
            row["vs_baseline"] = gold_win_rate(evaluator.scores[name], evaluator.scores[names[0]])
        if gold is rule_gold:
            totals: Counter[str] = Counter()
            replies = [(p, r) for p, samples in zip(prompts, evaluator.replies[name]) for r in samples]
            for p, r in replies:
                totals.update(rule_components(p, r))
            row["rule_components"] = {k: round(v / len(replies), 3) for k, v in totals.items()}
        results["versions"][name] = row  # type: ignore[index]
    results["replies"] = evaluator.replies
    return results


def report(results: dict[str, object]) -> str:
    lines = [f"{results['prompts']} held-out prompts, {results['sampling']}; {results['seconds']} s",
             f"baseline {results['baseline']}"]
    for name, row in results["versions"].items():  # type: ignore[union-attr]
        line = f"{name}: mean gold {row['mean_gold']:.3f}"
        w = row.get("vs_baseline")
        if w and w["rate"] is not None:
            line += (f"; wins {w['rate']:.1%} [{w['ci_low']:.1%}, {w['ci_high']:.1%}] of decisive pairs against "
                     f"{results['baseline']} ({w['wins']} wins, {w['losses']} losses, {w['ties']} ties)")
        if "rule_components" in row:
            line += "; " + ", ".join(f"{k} {v:.3f}" for k, v in row["rule_components"].items())
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("versions", nargs="+", metavar="NAME=PATH", help="The baseline first, then the versions to judge.")
    add_config_options(parser, EVAL_FIELDS)
    parser.add_argument("--json", default="", help="Write the figures and every reply here.")
    args = parser.parse_args(argv)
    versions = parse_versions(args.versions)
    cfg = BenchLoopConfig(**{name: getattr(args, name) for name in EVAL_FIELDS})
    results = judge(cfg, versions)
    print(report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
