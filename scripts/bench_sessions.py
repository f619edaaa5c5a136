"""Benchmark: what one new browser session costs the server, Gradio's own session state against the lean one.

Every page view, and every raw `queue/join` from a new session hash, makes Gradio create a SessionState
(chat_app/ui/session_state.py). Two parts:

  (a) in process, on the app's real page (built on a tiny model; no engine is started): N new sessions
      with Gradio's StateHolder, then N with the LeanStateHolder, --repeats times (A B A B ...): CPU ms
      and traced KiB per session, and the lean/stock ratios as median [min, max] over the pairs.
  (b) --http: `alignloop serve` on the tiny model (lean sessions, as served), N page loads over raw
      HTTP, each from a new session hash: the server's CPU ms and RSS KiB per page view.

    python scripts/bench_sessions.py                    # (a)
    python scripts/bench_sessions.py --http --sessions 500
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gradio.state_holder import StateHolder  # noqa: E402

from chat_app.app import AppConfig, build_app  # noqa: E402
from chat_app.ui.session_state import LeanStateHolder  # noqa: E402


@dataclass
class Cost:
    cpu_ms: float  # per session
    kib: float  # per session, traced by tracemalloc


def app_page(model_path: Path, workdir: Path):
    """The app's gr.Blocks as `alignloop serve` mounts it (the engine is not started); its
    `state_holder` and `_queue` are the served ones."""
    app, _ = build_app(AppConfig(db=workdir / "feedback.db", cache_dir=workdir / "cache"), model_path, "tiny")
    (holder,) = [r.app.state_holder for r in app.routes if hasattr(getattr(r, "app", None), "state_holder")]
    return holder.blocks


def new_sessions(blocks, holder_class: type[StateHolder], n: int) -> Cost:
    """CPU per session (a first pass) and memory per session (a second, traced pass) for n new sessions."""
    holder = holder_class()
    holder.set_blocks(blocks)
    gc.collect()
    start = time.process_time()
    for i in range(n):
        holder[f"cpu-{i}"]
    cpu_ms = 1000 * (time.process_time() - start) / n
    holder = holder_class()
    holder.set_blocks(blocks)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(n):
        holder[f"mem-{i}"]
    kib = (tracemalloc.get_traced_memory()[0] - before) / 1024 / n
    tracemalloc.stop()
    return Cost(cpu_ms, kib)


def median_range(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def in_process(sessions: int, repeats: int) -> None:
    from training.base_models import build_tiny_model

    workdir = Path(tempfile.mkdtemp(prefix="bench-sessions-"))
    blocks = app_page(build_tiny_model(workdir / "tiny-gemma3"), workdir)
    print(f"(a) the app's page: {len(blocks.blocks)} blocks; {sessions} new sessions per phase, {repeats} pairs")
    print(f"{'pair':<6}{'holder':<18}{'CPU ms/session':>16}{'KiB/session':>14}")
    cpu_ratios, kib_ratios = [], []
    for r in range(repeats):
        stock = new_sessions(blocks, StateHolder, sessions)
        lean = new_sessions(blocks, LeanStateHolder, sessions)
        for name, cost in (("gradio (stock)", stock), ("lean", lean)):
            print(f"{r + 1:<6}{name:<18}{cost.cpu_ms:>16.3f}{cost.kib:>14.1f}")
        cpu_ratios.append(lean.cpu_ms / stock.cpu_ms)
        kib_ratios.append(lean.kib / stock.kib)
    print(f"lean / stock CPU per new session:    {median_range(cpu_ratios)} (n={repeats})")
    print(f"lean / stock memory per new session: {median_range(kib_ratios)} (n={repeats})")


def over_http(sessions: int) -> None:
    import psutil

    from scripts.raw_gradio import RawGradio
    from tests.app_server import start_test_server, stop_server
    from training.base_models import build_tiny_model

    workdir = Path(tempfile.mkdtemp(prefix="bench-sessions-http-"))
    server = start_test_server(build_tiny_model(workdir / "tiny-gemma3"), workdir)
    try:
        raw = RawGradio(server.url)
        load = raw.fn_index(trigger="load")
        proc = psutil.Process(server.process.pid)
        for label, n in (("warm-up", min(50, sessions)), ("measured", sessions)):
            rss, cpu, failed = proc.memory_info().rss, sum(proc.cpu_times()[:2]), 0
            for _ in range(n):
                failed += not raw.call(load, [None], RawGradio.new_session()).success
            print(f"(b) {label}: {n} page loads from new sessions ({failed} failed): server "
                  f"{1000 * (sum(proc.cpu_times()[:2]) - cpu) / n:.1f} CPU ms and "
                  f"{(proc.memory_info().rss - rss) / 1024 / n:.1f} KiB RSS per page view")
        raw.close()
    finally:
        stop_server(server)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, default=300, help="New sessions per phase.")
    p.add_argument("--repeats", type=int, default=3, help="Interleaved pairs (stock, lean) in (a).")
    p.add_argument("--http", action="store_true", help="Also (b): page loads against a real server.")
    a = p.parse_args(argv)
    if a.sessions < 1 or a.repeats < 1:
        p.error("--sessions and --repeats must be at least 1.")
    in_process(a.sessions, a.repeats)
    if a.http:
        over_http(a.sessions)


if __name__ == "__main__":
    main()
