"""scripts/bench_serving.py end to end on the tiny model: raw engine and app measured in turn (interleaved
rounds), ratios per round as median [range], and promotions under load with no failed request."""

from __future__ import annotations

import re
import subprocess
import sys


def test_bench_serving_interleaves_rounds_and_reports_median_ratios() -> None:
    done = subprocess.run([sys.executable, "scripts/bench_serving.py", "--tiny", "--engines", "hf", "--repeats", "2",
                           "--users", "2", "--requests-per-user", "1", "--max-tokens", "8"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    phases = re.findall(r"^(\d)\s+\((a|b)\) .*?(-|gradio|http) ", out, re.MULTILINE)
    # A B A B, in that order; the app once with each kind of client
    assert phases == [("1", "a", "-"), ("1", "b", "gradio"), ("1", "b", "http")] * 1 + \
        [("2", "a", "-"), ("2", "b", "gradio"), ("2", "b", "http")], out
    for client in ("gradio", "http"):
        assert re.search(rf"app \({client} clients\) / raw tokens/s \(hf\)\s+[\d.]+ \[[\d.]+, [\d.]+\] \(n=2\)", out)
        assert re.search(rf"CPU s / 1k tokens \({client}\), bench/server/engine\s+[\d.]+ / [\d.]+ / [\d.]+", out)
    for row in re.findall(r"^\d\s+\(b\) app /chat\s+hf\s+(?:gradio|http)\s+(.*)$", out, re.MULTILINE):
        reqs, failed, tokens, wall, rate, ttft50 = row.split()[1:7]
        assert failed == "0" and int(tokens) > 0 and float(ttft50) > 0, row  # each client saw every first token
        assert re.search(r"[\d.]+ / [\d.]+ / [\d.]+$", row)  # CPU seconds: bench / server / engine
    assert re.search(r"failed app requests \(b\)\+\(c\)\s+0\s+target 0: met", out)
    assert len(re.findall(r"first token from the new version after [\d.]+ s", out)) == 2  # both served
    assert len(re.findall(r"router switched after [\d.]+ s .* older version: 0$", out, re.MULTILINE)) == 2, out


def test_bench_serving_promotion_only_repeats_both_kinds_of_promotion() -> None:
    """--promotion-only skips (a) and (b); --promotions 2 promotes 4 versions, alternating the two kinds,
    and reports each kind's median first token."""
    done = subprocess.run([sys.executable, "scripts/bench_serving.py", "--tiny", "--engines", "hf", "--promotion-only",
                           "--promotions", "2", "--users", "2", "--max-tokens", "8"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert not re.findall(r"^\d\s+\((a|b)\) ", out, re.MULTILINE)  # no raw-engine or app rounds
    kinds = re.findall(r"^promotion \d \((.*)\):$", out, re.MULTILINE)
    assert kinds == ["registered + promoted at once", "preloaded candidate promoted"] * 2
    assert len(re.findall(r"router switched after [\d.]+ s .* older version: 0$", out, re.MULTILINE)) == 4, out
    for how in ("at once", "preloaded"):
        assert re.search(rf"first token \({how}\), median \[range\]\s+[\d.]+ \[[\d.]+, [\d.]+\] \(n=2\)\s+\(0 of 2 never",
                         out)
    assert re.search(r"failed app requests \(b\)\+\(c\)\s+0\s+target 0: met", out)
