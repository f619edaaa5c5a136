"""Benchmark: C concurrent simulated users against the raw engine and against the app.

Parts, all in one run, printed as one table with the ratios side by side. The raw engines and the
app are measured in turn, --repeats times (A B A B ...), and every ratio is taken within a round and
quoted as its median and range:

  (a) raw engine: C asyncio tasks stream requests straight through `engine.stream()`, for
      each engine in --engines (vLLM and transformers: the vllm/hf ratio).
  (b) the app: `alignloop serve` as a subprocess (same engine kind, fresh database) and C users
      calling `/chat`, tokens counted from the stored replies, once per kind of client in
      --app-clients: `gradio` (gradio_client, which rebuilds every streamed output in Python
      threads) and `http` (a browser's share of the work: join the queue by fn_index and read the
      event stream, scripts/raw_gradio.py). The clients run on this machine's cores, beside
      the server; a remote browser's do not, so the table shows each process's CPU seconds.
  (c) promotion under load: while C app users keep chatting (plus one probe user sending
      8-token requests back to back), two LoRA versions are registered and promoted one after
      the other from this process (the server polls the registry); counts failed requests and,
      for a request sent right after `promote()` (sent again while the old version answers), the
      time until its first token from the new version. The probe's TTFT is the floor under it.

TTFT is the time until the first non-empty text; tokens/s is all completion tokens over the
wall time of the phase. CPU seconds per phase (psutil): `bench` is this process (the clients in
(b), the engine's front end in (a)), `server` the app's process, `engine` every process below
either of them (vLLM's engine core; the transformers engine runs inside its caller).

Replies are greedy (temperature 0 by default) and both sides sample alike (the app's default
--frequency-penalty 0.5 and --min-p 0.1, sent with every request), so (a) and (b) decode the same
text for the same prompts.

    python scripts/bench_serving.py --tiny                       # smoke run, tiny random model
    python scripts/bench_serving.py -c 8 --requests-per-user 2   # the embedded Gemma 3 270M
    python scripts/bench_serving.py --promotion-only --promotions 3 --max-loras 2   # only (c), 3 pairs

`--app-concurrency N` runs the server with GRADIO_DEFAULT_CONCURRENCY_LIMIT=N (only used where
the app sets no limit of its own; it sets 64 /chat calls at once).

Targets: app/raw tokens/s >= 0.9; vLLM/transformers tokens/s at C = 8 >= 3; 0 failed requests
during promotions; the new version serves < 1 s after promote().
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chat_app.engines import EngineConfig, SamplingConfig, create_engine  # noqa: E402
from scripts.raw_gradio import RawGradio  # noqa: E402
from scripts.server_process import ServerProcess, start_server, stop_server  # noqa: E402
from feedback_db import FeedbackStore, ModelRegistry, ModelVersion  # noqa: E402

PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a hash table is.",
    "Give me three tips for learning to cook.",
    "What is the capital of France, and why is it famous?",
    "Tell me a story about a robot who learns to paint.",
    "How do vaccines work?",
    "Describe a sunset to someone who has never seen one.",
    "What are the pros and cons of remote work?",
]
MAX_MODEL_LEN = 2048  # what `alignloop serve` uses by default, so (a) and (b) run the same engine setup


@dataclass
class BenchConfig:
    """One benchmark run."""

    model: str = "default"  # "default" (embedded Gemma 3 270M), a prepared folder, or an HF id
    tiny: bool = False  # a tiny random model instead (a smoke run in seconds)
    users: int = 8
    requests_per_user: int = 2
    max_tokens: int = 32
    temperature: float = 0.0
    # The app's own defaults (`alignloop serve --frequency-penalty 0.5 --min-p 0.1`), sent by the app's
    # users and given to the raw engine too: both sides do the same sampling work.
    frequency_penalty: float = 0.5
    min_p: float = 0.1
    engines: tuple[str, ...] = ("vllm", "hf")
    app_engine: str | None = None  # engine the app runs on; default: the first of `engines`
    skip_app: bool = False
    skip_promotion: bool = False
    promotion_only: bool = False  # only (c): no raw engines, no (b) rounds
    promotions: int = 1  # pairs of promotions in (c): one registered and promoted at once, one preloaded
    max_loras: int | None = None  # the engines' EngineConfig.max_loras (None: its default)
    promotion_timeout_s: float = 60.0  # give up waiting for the new version after this long
    server_start_timeout_s: float = 600.0
    # GRADIO_DEFAULT_CONCURRENCY_LIMIT for the server; None: the app as shipped. Gradio runs one
    # request per event at a time unless told otherwise, which serialises /chat across users.
    app_concurrency: int | None = None
    repeats: int = 3  # interleaved rounds: raw engines and app measured A B A B ..., ratios per round
    app_clients: tuple[str, ...] = ("gradio", "http")  # the kinds of client (b) is measured with, in turn


@dataclass
class RequestResult:
    """One simulated user's request."""

    started: float  # time.perf_counter()
    ttft_s: float | None = None
    tokens: int = 0
    error: str | None = None


@dataclass
class PhaseResult:
    """All requests of one phase and how long the phase took."""

    name: str
    engine: str
    results: list[RequestResult] = field(default_factory=list)
    wall_s: float = 0.0
    tokens: int = 0  # completion tokens of the whole phase
    client: str = ""  # (b): the kind of client
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds during the phase: bench, server, engine

    @property
    def failed(self) -> int:
        return sum(r.error is not None for r in self.results)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0

    def ttft(self, q: float) -> float | None:
        values = sorted(r.ttft_s for r in self.results if r.ttft_s is not None)
        return percentile(values, q) if values else None


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of an already sorted list."""
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def prompt_for(user: int, request: int) -> str:
    return PROMPTS[(user * 3 + request) % len(PROMPTS)]


CPU_ROLES = ("bench", "server", "engine")


def cpu_seconds(server_pid: int | None) -> dict[str, float]:
    """User + system CPU seconds so far of this process, the server's, and every process below either
    (see the module docstring); a process that exits meanwhile stops counting."""
    import psutil

    def used(proc: "psutil.Process") -> float:
        try:
            t = proc.cpu_times()
            return t.user + t.system
        except psutil.Error:
            return 0.0

    me = psutil.Process()
    tops = [me] + ([psutil.Process(server_pid)] if server_pid else [])
    below = []
    for top in tops:
        try:
            below += top.children(recursive=True)
        except psutil.Error:
            pass
    return {"bench": used(me), "server": used(tops[1]) if server_pid else 0.0,
            "engine": sum(used(p) for p in {p.pid: p for p in below if p.pid != server_pid}.values())}


def cpu_spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Per role, the CPU seconds between two `cpu_seconds` readings (a process that exited: never negative)."""
    return {role: max(0.0, after[role] - before[role]) for role in CPU_ROLES}


# -- (a) the raw engine --------------------------------------------------------------------------
async def open_engine(name: str, model_path: Path, cfg: BenchConfig):
    """An engine for (a), warmed up: the first request pays for compilation and caches."""
    kind, cores = engine_kind(name)
    engine = create_engine(kind, model_path, engine_config(cfg, cores))  # type: ignore[arg-type]
    async for _ in engine.stream([{"role": "user", "content": "Hi"}], sampling=_sampling(cfg)):
        pass
    return engine


def engine_config(cfg: BenchConfig, cpu_cores: str | None = None) -> EngineConfig:
    """The raw engines' settings: those of `alignloop serve` as (b) starts it."""
    loras = {} if cfg.max_loras is None else {"max_loras": cfg.max_loras}
    return EngineConfig(max_model_len=MAX_MODEL_LEN, cpu_cores=cpu_cores, **loras)


def engine_kind(name: str) -> tuple[str, str | None]:
    """("vllm" or "hf", EngineConfig.cpu_cores) of an --engines entry: "vllm", "hf", "vllm@all", "vllm@auto"."""
    kind, _, cores = name.partition("@")
    return kind, cores or None


def _sampling(cfg: BenchConfig) -> SamplingConfig:
    return SamplingConfig(temperature=cfg.temperature, top_p=0.95, max_tokens=cfg.max_tokens,
                          frequency_penalty=cfg.frequency_penalty, min_p=cfg.min_p)


async def bench_engine(engine, cfg: BenchConfig, name: str | None = None, server_pid: int | None = None) -> PhaseResult:
    """C tasks, each streaming `requests_per_user` requests one after another through `engine.stream()`;
    `name`: the --engines entry (default: the engine's own name); `server_pid`: the idle app's, whose CPU
    is counted too."""
    sampling = _sampling(cfg)
    phase = PhaseResult("(a) raw engine", name or engine.name)

    async def user(u: int) -> None:
        for j in range(cfg.requests_per_user):
            result = RequestResult(time.perf_counter())
            phase.results.append(result)
            try:
                async for chunk in engine.stream([{"role": "user", "content": prompt_for(u, j)}], sampling=sampling):
                    if result.ttft_s is None and chunk.delta:
                        result.ttft_s = time.perf_counter() - result.started
                    if chunk.finished:
                        result.tokens = chunk.completion_tokens
            except Exception as exc:
                result.error = f"{type(exc).__name__}: {exc}"

    cpu, start = cpu_seconds(server_pid), time.perf_counter()
    await asyncio.gather(*(user(u) for u in range(cfg.users)))
    phase.wall_s = time.perf_counter() - start
    phase.cpu_s = cpu_spent(cpu, cpu_seconds(server_pid))
    phase.tokens = sum(r.tokens for r in phase.results)
    return phase


# -- (b) the app ---------------------------------------------------------------------------------
def start_app(name: str, model: str, workdir: Path, cfg: BenchConfig) -> ServerProcess:
    """`alignloop serve` in a subprocess, fresh database, ready once its engine is."""
    env = {"GRADIO_DEFAULT_CONCURRENCY_LIMIT": str(cfg.app_concurrency)} if cfg.app_concurrency is not None else {}
    kind, cores = engine_kind(name)
    extra = ["--max-loras", str(cfg.max_loras)] if cfg.max_loras is not None else []
    extra += ["--cpu-cores", cores] if cores else []
    return start_server(model, workdir, engine=kind, env=env, timeout=cfg.server_start_timeout_s,
                        serve_args=["--max-new-tokens", str(cfg.max_tokens), "--max-model-len", str(MAX_MODEL_LEN),
                                    "--rate-limit", "0", "--new-ids-per-hour", "0", *extra])


def _assistant_text(history: list) -> str:
    """The last chatbot message's text (gradio 6 may send content as [{"type": "text", ...}])."""
    if not history or history[-1].get("role") != "assistant":
        return ""
    content = history[-1].get("content")
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content or ""


def chat_once(client, text: str, cfg: BenchConfig) -> RequestResult:
    """One `/chat` call as a browser makes it, in a new conversation (a fresh page: the raw engine gets one
    user turn too, so both sides prefill the same prompt); TTFT is the first update with assistant text."""
    client.reset_session()  # else the session's conversation grows with every call: longer and longer prompts
    result = RequestResult(time.perf_counter())
    try:
        job = client.submit(text, [], "", cfg.temperature, 0.95, cfg.max_tokens, cfg.frequency_penalty, cfg.min_p,
                            api_name="/chat")
        for output in job:
            if result.ttft_s is None and _assistant_text(output[1]):
                result.ttft_s = time.perf_counter() - result.started
        result.error = reply_error(job.result(timeout=300))
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:200]
    return result


class HttpChatClient:
    """A browser's share of a `/chat` call: join the queue by fn_index with the Chat tab's inputs, read
    the event stream (scripts/raw_gradio.py), note when the first assistant text arrives. Nothing is
    rebuilt from the diffs but the final output, which the server sends whole."""

    def __init__(self, url: str) -> None:
        self.raw = RawGradio(url, timeout=300.0)
        self.fn_index = self.raw.fn_index("chat")
        self.inputs = self.raw.inputs_of(self.fn_index)

    def data(self, text: str, cfg: BenchConfig) -> list:
        """The /chat inputs in order: the message, an empty chat, no server-held states, no system
        prompt, and the sliders by their labels."""
        sliders = {"Temperature": cfg.temperature, "Top-p": 0.95, "Max new tokens": cfg.max_tokens,
                   "Frequency penalty": cfg.frequency_penalty, "Min-p": cfg.min_p}
        out, texts = [], 0
        for c in self.inputs:
            kind, label = c.get("type"), (c.get("props") or {}).get("label") or ""
            if kind == "textbox":
                out.append(text if texts == 0 else "")
                texts += 1
            elif kind == "chatbot":
                out.append([])
            elif kind == "slider":
                out.append(next(v for name, v in sliders.items() if label.startswith(name)))
            else:
                out.append(None)
        return out

    def chat(self, text: str, cfg: BenchConfig) -> RequestResult:
        """One `/chat` call in a new session (a fresh page), as `chat_once` with gradio_client."""
        result = RequestResult(time.perf_counter())

        def first_text(message: dict) -> None:
            if result.ttft_s is None and message.get("msg") == "process_generating" and _has_text(message):
                result.ttft_s = time.perf_counter() - result.started

        try:
            outcome = self.raw.call(self.fn_index, self.data(text, cfg), RawGradio.new_session(),
                                    on_message=first_text)
            result.error = (reply_error(outcome.data) if outcome.success
                            else (outcome.error or "the call failed")[:200])
        except Exception as exc:
            result.error = f"{type(exc).__name__}: {exc}"[:200]
        return result

    def close(self) -> None:
        self.raw.close()


def reply_error(outputs: list) -> str | None:
    """The error a finished `/chat` shows, if any: the service's error text (engine_failure_message)
    starts with ⚠️, in the status line (the last output) or the reply; other status lines are notes
    (a reply cut at the token limit, old turns left out of the context)."""
    status, reply = str(outputs[-1] or "").strip(), _assistant_text(outputs[1])
    if status.startswith("⚠️") or reply.startswith("⚠️"):
        return (status if status.startswith("⚠️") else reply)[:200]
    return None


def _has_text(message: dict) -> bool:
    """Whether a streamed update carries assistant text: the chat (output 1) whole, or its diff ops."""
    chat = (message.get("output") or {}).get("data", [None, None])[1]
    if not isinstance(chat, list) or not chat:
        return False
    if isinstance(chat[0], dict):  # the whole chat (the first update)
        return bool(_assistant_text(chat))
    return any(isinstance(op, list) and len(op) == 3 and isinstance(op[2], str) and op[2] for op in chat)


def _db_rows(db_path: Path, sql: str, params: tuple = ()) -> list[tuple]:
    conn = sqlite3.connect(db_path, timeout=30)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def _last_message_id(db_path: Path) -> int:
    return _db_rows(db_path, "SELECT COALESCE(MAX(id), 0) FROM messages")[0][0]


def _completion_tokens_since(db_path: Path, after_id: int) -> int:
    return _db_rows(db_path, "SELECT COALESCE(SUM(completion_tokens), 0) FROM messages "
                             "WHERE role = 'assistant' AND id > ?", (after_id,))[0][0]


def make_clients(url: str, n: int, kind: str = "gradio") -> list:
    """One client per simulated user (each is its own session, with its own chat state): gradio_client's
    `Client`, or (kind "http") `HttpChatClient`."""
    if kind == "http":
        return [HttpChatClient(url) for _ in range(n)]
    from gradio_client import Client

    return [Client(url, verbose=False) for _ in range(n)]


def app_chat(client, text: str, cfg: BenchConfig) -> RequestResult:
    """One `/chat` call with either kind of client."""
    return client.chat(text, cfg) if isinstance(client, HttpChatClient) else chat_once(client, text, cfg)


def bench_app(server: ServerProcess, kind: str, clients: list, cfg: BenchConfig, client_kind: str = "gradio") -> PhaseResult:
    """C threads, one client each, `requests_per_user` `/chat` calls one after another."""
    phase = PhaseResult("(b) app /chat", kind, client=client_kind)
    watermark = _last_message_id(server.db_path)
    lock = threading.Lock()

    def user(u: int) -> None:
        for j in range(cfg.requests_per_user):
            result = app_chat(clients[u], prompt_for(u, j), cfg)
            with lock:
                phase.results.append(result)

    cpu, start = cpu_seconds(server.process.pid), time.perf_counter()
    threads = [threading.Thread(target=user, args=(u,)) for u in range(cfg.users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    phase.wall_s = time.perf_counter() - start
    phase.cpu_s = cpu_spent(cpu, cpu_seconds(server.process.pid))
    phase.tokens = _completion_tokens_since(server.db_path, watermark)
    return phase


# -- (c) promotion under load --------------------------------------------------------------------
@dataclass
class PromotionResult:
    phase: PhaseResult
    first_token_s: list[float | None]  # per promotion: promote() -> first token from the new version, for a
    #                                    request sent right after promote() (sent again while the old one answers)
    resent: list[int]  # requests of that probe the old version still answered
    switch_s: list[float | None]  # promote() -> the server's router logged the new live version
    old_after_switch: list[int]  # requests started after that switch that still got an older version
    load_ttft_s: float | None  # median TTFT of the back-to-back 8-token probe under the same load (old versions)


def _iso_to_ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def _version_of_reply_to(db_path: Path, text: str) -> int | None:
    """The model version of the newest stored reply to the user message `text`."""
    rows = _db_rows(db_path, "SELECT r.model_version_id FROM messages r JOIN messages u ON u.id = r.parent_id "
                             "WHERE r.role = 'assistant' AND u.content = ? ORDER BY r.id DESC LIMIT 1", (text,))
    return rows[0][0] if rows else None


def _log_times(log_path: Path, pattern: str) -> dict[str, float]:
    """When the server logged `pattern` (one group: a version name), by that name, the last time each."""
    times = {}
    for line in log_path.read_text(errors="replace").splitlines():
        match = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO chat_app\.router: " + pattern, line)
        if match:  # logging's asctime is local time, as datetime.timestamp() assumes for naive times
            times[match[2]] = datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return times


def _stale_starts(db_path: Path, older_ids: list[int], start_ts: float, end_ts: float, after_id: int) -> int:
    """Requests started in (start_ts, end_ts) that were served by one of the versions `older_ids`. (Not "any
    other version": a request started just before the next promote() may rightly get the next version.)"""
    marks = ",".join("?" * len(older_ids))
    rows = _db_rows(db_path, "SELECT u.created_at FROM messages r JOIN messages u ON u.id = r.parent_id "
                             f"WHERE r.role = 'assistant' AND r.model_version_id IN ({marks}) AND r.id > ?",
                    (*older_ids, after_id))
    return sum(start_ts < _iso_to_ts(created) < end_ts for (created,) in rows)


def first_token_on(server: ServerProcess, client, version_id: int, since: float, tag: str,
                   cfg: BenchConfig) -> tuple[float | None, int]:
    """(seconds from `since` to the first token of a request the version `version_id` served, requests the
    old version answered first). The request is sent at once, and sent again as soon as a reply shows that
    the router had not switched yet; each carries `tag` so its stored reply names the version behind it."""
    deadline = time.monotonic() + cfg.promotion_timeout_s
    resent = 0
    while time.monotonic() < deadline:
        text = f"Say hi. ({tag}.{resent})"
        first = None
        client.reset_session()  # a new conversation, as every request of this benchmark
        job = client.submit(text, [], "", cfg.temperature, 0.95, min(cfg.max_tokens, 8), cfg.frequency_penalty,
                            cfg.min_p, api_name="/chat")
        for output in job:
            if first is None and _assistant_text(output[1]):
                first = time.time()
        job.result(timeout=300)
        if first is not None and _version_of_reply_to(server.db_path, text) == version_id:
            return first - since, resent
        resent += 1
    return None, resent


def bench_promotion(server: ServerProcess, kind: str, model_path: Path, base_name: str, clients: list,
                    workdir: Path, cfg: BenchConfig) -> PromotionResult:
    """Users chat non-stop while LoRA versions are promoted one after the other (--promotions pairs: one
    registered and promoted at once, then one preloaded as the candidate first); right after each
    promote(), a request is sent and timed to its first token from the new version."""
    from tests.engine_contract import make_lora_adapter  # a random LoRA that visibly changes the output

    store = FeedbackStore(server.db_path)
    registry = ModelRegistry(store)
    stamp = int(time.time())
    # Built before the load starts: training is not what is measured here.
    paths = [make_lora_adapter(model_path, workdir / f"lora-{i}", seed=i + 1) for i in range(2 * cfg.promotions)]

    phase = PhaseResult("(c) app, promoting", kind)
    watermark = _last_message_id(server.db_path)
    first_live = registry.live("policy")
    stop = threading.Event()
    lock = threading.Lock()
    # A probe user sends 8-token requests back to back (the UI slider allows no fewer): its TTFT is what
    # any request waits under this load, the floor under the time a new version takes to answer.
    probe_cfg = replace(cfg, max_tokens=min(cfg.max_tokens, 8))
    probe_client, timer_client = make_clients(server.url, 2)
    probe_ttft: list[float] = []

    def user(u: int) -> None:
        j = 0
        while not stop.is_set():
            if u == cfg.users:
                result = chat_once(probe_client, "Say hi.", probe_cfg)
                if result.ttft_s is not None:
                    probe_ttft.append(result.ttft_s)
            else:
                result = app_chat(clients[u], prompt_for(u, j), cfg)
            j += 1
            with lock:
                phase.results.append(result)

    start = time.perf_counter()
    threads = [threading.Thread(target=user, args=(u,)) for u in range(cfg.users + 1)]
    for t in threads:
        t.start()
    promotions: list[tuple[ModelVersion, float, float | None, int]] = []  # (version, promoted at, first token, resent)
    try:
        time.sleep(2.0)  # let the load settle
        for i, path in enumerate(paths):
            # 1: registered and promoted at once (the adapter loads after promote, under load);
            # 2: registered first, so the router preloads it as the candidate, then promoted.
            version = registry.register(f"bench-lora-{stamp}-{i}", adapter_path=path, base_model=base_name)
            if i % 2 == 1:  # wait for the preload itself: under load an adapter can take longer than any fixed pause
                deadline = time.monotonic() + cfg.promotion_timeout_s
                while (version.name not in _log_times(server.log_path, r"serving (\S+) ")
                       and time.monotonic() < deadline):
                    time.sleep(0.1)
            promoted_at = time.time()
            registry.promote(version.id, actor="bench")
            first, resent = first_token_on(server, timer_client, version.id, promoted_at, f"{stamp}-{i}", cfg)
            promotions.append((version, promoted_at, first, resent))
            time.sleep(2.0)  # keep the load on a little after the switch
    finally:
        stop.set()
        for t in threads:
            t.join()
        for c in (probe_client, timer_client):
            c.close()
        store.close()
    phase.wall_s = time.perf_counter() - start
    phase.tokens = _completion_tokens_since(server.db_path, watermark)
    switched = _log_times(server.log_path, r"live: (\S+) ")
    switch_at = [switched.get(v.name) for v, *_ in promotions]
    # After the router's switch, until the next promotion, no request should get an older version
    # (50 ms of slack: a user turn is stored just before the router picks the version).
    ends = [at for _, at, *_ in promotions[1:]] + [float("inf")]
    versions = [first_live.id] + [v.id for v, *_ in promotions]  # live at the start, then each promoted one
    stale = [-1 if sw is None else _stale_starts(server.db_path, versions[:k + 1], sw + 0.05, end, watermark)
             for k, (sw, end) in enumerate(zip(switch_at, ends))]
    return PromotionResult(
        phase, first_token_s=[first for _, _, first, _ in promotions], resent=[r for *_, r in promotions],
        switch_s=[None if sw is None else max(0.0, sw - at) for (_, at, *_), sw in zip(promotions, switch_at)],
        old_after_switch=stale, load_ttft_s=statistics.median(probe_ttft) if probe_ttft else None)


# -- the report ----------------------------------------------------------------------------------
def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def median_range(values: list[float]) -> str:
    """"median [min, max] (n)" of per-round values."""
    if not values:
        return "n/a"
    return f"{statistics.median(values):.2f} [{min(values):.2f}, {max(values):.2f}] (n={len(values)})"


def ratios(rounds: list[list[PhaseResult]], top: Callable[[list[PhaseResult]], PhaseResult | None],
           bottom: Callable[[list[PhaseResult]], PhaseResult | None]) -> list[float]:
    """top/bottom tokens/s within each round (phases measured side by side)."""
    out = []
    for phases in rounds:
        a, b = top(phases), bottom(phases)
        if a is not None and b is not None and b.tokens_per_s:
            out.append(a.tokens_per_s / b.tokens_per_s)
    return out


def print_report(cfg: BenchConfig, rounds: list[list[PhaseResult]], promotion: PromotionResult | None) -> None:
    header = f"{'round':<6}{'phase':<22}{'engine':<10}{'client':<8}{'C':>3}{'reqs':>6}{'failed':>7}{'tokens':>8}" \
             f"{'wall s':>8}{'tok/s':>8}{'TTFT p50':>10}{'TTFT p95':>10}   CPU s: bench / server / engine"
    print()
    print(f"model={'tiny random' if cfg.tiny else cfg.model}  users={cfg.users}  "
          f"requests/user={cfg.requests_per_user}  max_tokens={cfg.max_tokens}  temperature={cfg.temperature}  "
          f"app concurrency={cfg.app_concurrency or 'app default (64)'}  repeats={cfg.repeats} (interleaved)  "
          f"max_loras={cfg.max_loras or EngineConfig.max_loras}")
    print(header)
    print("-" * len(header))
    rows = [(str(i + 1), p) for i, phases in enumerate(rounds) for p in phases]
    rows += [("-", promotion.phase)] if promotion else []
    for r, p in rows:
        cpu = " / ".join(f"{p.cpu_s[role]:.1f}" for role in CPU_ROLES) if p.cpu_s else "-"
        print(f"{r:<6}{p.name:<22}{p.engine:<10}{p.client or '-':<8}{cfg.users:>3}{len(p.results):>6}{p.failed:>7}"
              f"{p.tokens:>8}{p.wall_s:>8.1f}{p.tokens_per_s:>8.1f}{_fmt(p.ttft(50)):>10}{_fmt(p.ttft(95)):>10}   {cpu}")
    print()

    def raw(kind: str) -> Callable[[list[PhaseResult]], PhaseResult | None]:
        return lambda phases: next((p for p in phases if p.name.startswith("(a)") and p.engine == kind), None)

    def app(client: str) -> Callable[[list[PhaseResult]], PhaseResult | None]:
        return lambda phases: next((p for p in phases if p.name.startswith("(b)") and p.client == client), None)

    app_kind = cfg.app_engine or cfg.engines[0]
    for client in cfg.app_clients:
        app_raw = ratios(rounds, app(client), raw(app_kind))
        if not app_raw:
            continue
        print(f"{f'app ({client} clients) / raw tokens/s ({app_kind})':<46}{median_range(app_raw)}   target >= 0.9: "
              f"{_verdict(statistics.median(app_raw) >= 0.9)}")
        ttft = [a.ttft(50) - b.ttft(50) for phases in rounds if (a := app(client)(phases))
                and (b := raw(app_kind)(phases)) and a.ttft(50) is not None and b.ttft(50) is not None]
        if ttft:
            print(f"{f'app ({client}) - raw TTFT p50 ({app_kind}), s':<46}{median_range(ttft)}")
        per_k = {role: [1000 * a.cpu_s[role] / a.tokens for phases in rounds if (a := app(client)(phases)) and a.tokens]
                 for role in CPU_ROLES}
        if all(per_k.values()):
            print(f"{f'  CPU s / 1k tokens ({client}), bench/server/engine':<50}"
                  + " / ".join(f"{statistics.median(v):.2f}" for v in per_k.values()))
    raw_k = [1000 * sum(b.cpu_s[role] for role in CPU_ROLES) / b.tokens for phases in rounds
             if (b := raw(app_kind)(phases)) and b.cpu_s and b.tokens]
    if raw_k:
        print(f"{f'  CPU s / 1k tokens, raw {app_kind}, all processes':<50}{statistics.median(raw_k):.2f}")
    vllms = [e for e in cfg.engines if engine_kind(e)[0] == "vllm"]
    for name in vllms:
        vllm_hf = ratios(rounds, raw(name), raw("hf"))
        if vllm_hf:
            print(f"{f'{name} / hf tokens/s at C={cfg.users}':<46}{median_range(vllm_hf)}   target >= 3: "
                  f"{_verdict(statistics.median(vllm_hf) >= 3)}")
    for name in vllms[1:]:
        print(f"{f'{name} / {vllms[0]} tokens/s':<46}{median_range(ratios(rounds, raw(name), raw(vllms[0])))}")
    if promotion is not None:
        failed = promotion.phase.failed + sum(p.failed for phases in rounds for p in phases if not p.name.startswith("(a)"))
        print(f"{'failed app requests (b)+(c)':<46}{failed:>6}   target 0: {_verdict(failed == 0)}")
        print(f"{'probe TTFT (8 tokens) under this load, p50':<46}{_fmt(promotion.load_ttft_s):>6} s"
              "   (the floor under a new version's first token)")
        for i, (first, resent, switch, stale) in enumerate(zip(promotion.first_token_s, promotion.resent,
                                                              promotion.switch_s, promotion.old_after_switch)):
            how = ("registered + promoted at once", "preloaded candidate promoted")[i % 2]
            print(f"promotion {i + 1} ({how}):")
            print(f"    first token from the new version after {_fmt(first)} s (a request sent right after"
                  f" promote(); {resent} answered by the old one first)   target < 1 s: "
                  f"{_verdict(first is not None and first < 1.0)}")
            print(f"    router switched after {_fmt(switch)} s (its log); requests started after the switch"
                  f" that got an older version: {stale}")
        if cfg.promotions > 1:
            for k, how in enumerate(("at once", "preloaded")):
                firsts = promotion.first_token_s[k::2]
                done = [f for f in firsts if f is not None]
                print(f"{f'first token ({how}), median [range]':<46}{median_range(done) if done else '-'}"
                      f"   ({len(firsts) - len(done)} of {len(firsts)} never served)")
        errors = sorted({r.error for r in promotion.phase.results if r.error})
        for e in errors[:5]:
            print(f"  error: {e}")


# -- main ----------------------------------------------------------------------------------------
def run(cfg: BenchConfig) -> None:
    """Every engine of (a) and the app (b) stay up for the whole run and are measured in turn, --repeats
    times (raw engines, app, raw engines, app, ...): on a shared, noisy machine a ratio is only taken
    between phases measured side by side, and the report quotes the median ratio and its range."""
    from training.base_models import build_tiny_model, prepare_model, resolve_model

    workdir = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    if cfg.tiny:
        model_path = build_tiny_model(workdir / "tiny-gemma3")
        model = str(model_path)
    else:
        model_path, model = Path(prepare_model(cfg.model)), cfg.model
    base_name = resolve_model(model).name

    loop = asyncio.new_event_loop()  # the raw engines live on this loop between their phases
    engines = {}
    server = None
    clients: dict[str, list] = {}
    rounds: list[list[PhaseResult]] = []
    promotion = None
    try:
        for kind in () if cfg.promotion_only else cfg.engines:
            print(f"(a) raw {kind} engine: starting…", flush=True)
            engines[kind] = loop.run_until_complete(open_engine(kind, model_path, cfg))
        kind = cfg.app_engine or cfg.engines[0]
        if not cfg.skip_app:
            print(f"(b) app on the {kind} engine: starting the server…", flush=True)
            app_dir = workdir / "app"
            app_dir.mkdir()
            server = start_app(kind, model, app_dir, cfg)
            clients = {how: make_clients(server.url, cfg.users, how) for how in cfg.app_clients}
            for how in cfg.app_clients:
                app_chat(clients[how][0], "Hi", cfg)  # untimed, as the engines' first request
        for r in range(0 if cfg.promotion_only else cfg.repeats):
            phases = []
            for name, engine in engines.items():
                print(f"round {r + 1}/{cfg.repeats}: (a) raw {name}…", flush=True)
                phases.append(loop.run_until_complete(
                    bench_engine(engine, cfg, name, server.process.pid if server else None)))
            for how in clients:
                print(f"round {r + 1}/{cfg.repeats}: (b) app, {how} clients…", flush=True)
                phases.append(bench_app(server, kind, clients[how], cfg, how))
            rounds.append(phases)
        if server is not None and not cfg.skip_promotion:
            print("(c) promotions under load…", flush=True)
            promotion = bench_promotion(server, kind, model_path, base_name, clients[cfg.app_clients[0]],
                                        workdir / "app", cfg)
    finally:
        for client in (c for group in clients.values() for c in group):
            client.close()
        if server is not None:
            stop_server(server)
            print(f"server log: {server.log_path}")
        for engine in engines.values():
            loop.run_until_complete(engine.close())
        loop.close()
    print_report(cfg, rounds, promotion)


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    d = BenchConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=d.model, help="'default' (embedded Gemma 3 270M), a folder or an HF id.")
    p.add_argument("--tiny", action="store_true", help="Use a tiny random model (a quick smoke run).")
    p.add_argument("--users", "-c", type=int, default=d.users, help="Concurrent simulated users (C).")
    p.add_argument("--requests-per-user", type=int, default=d.requests_per_user,
                   help="Requests each user sends one after another in (a) and (b).")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="Reply length limit per request.")
    p.add_argument("--temperature", type=float, default=d.temperature, help="0: greedy (same text in (a) and (b)).")
    p.add_argument("--frequency-penalty", type=float, default=d.frequency_penalty,
                   help="Sent with every request, to the app and to the raw engine alike (the app's default).")
    p.add_argument("--min-p", type=float, default=d.min_p,
                   help="Sent with every request, to the app and to the raw engine alike (the app's default).")
    p.add_argument("--engines", default=",".join(d.engines),
                   help="Engines for (a), comma-separated: vllm,hf; vllm@CORES sets EngineConfig.cpu_cores "
                        "(auto, all, 0-3), e.g. vllm@auto,vllm@all,hf.")
    p.add_argument("--app-engine", default=None, help="Engine the app runs on (default: the first of --engines).")
    p.add_argument("--skip-app", action="store_true", help="Only (a): no server, no promotion.")
    p.add_argument("--skip-promotion", action="store_true", help="Skip (c), the promotions under load.")
    p.add_argument("--promotion-only", action="store_true", help="Only (c): no raw engines, no (b) rounds.")
    p.add_argument("--promotions", type=int, default=d.promotions,
                   help="Pairs of promotions in (c): one registered and promoted at once, then one preloaded.")
    p.add_argument("--max-loras", type=int, default=None,
                   help="EngineConfig.max_loras for every engine (`alignloop serve --max-loras`; default: its default).")
    p.add_argument("--app-concurrency", type=int, default=None,
                   help="Set GRADIO_DEFAULT_CONCURRENCY_LIMIT for the server (default: unset, Gradio's 1).")
    p.add_argument("--app-clients", default=",".join(d.app_clients),
                   help="Kinds of client (b) is measured with, in turn: gradio (gradio_client) and/or http (raw "
                        "queue/join + event stream, a browser's share of the work); (c) uses the first.")
    p.add_argument("--repeats", type=int, default=d.repeats,
                   help="Interleaved rounds (raw engines, app, raw engines, app, ...); ratios are per round.")
    p.add_argument("--promotion-timeout", type=float, default=d.promotion_timeout_s,
                   help="Seconds to wait for a promoted version to serve before giving up.")
    a = p.parse_args(argv)
    engines = tuple(e.strip() for e in a.engines.split(",") if e.strip())
    if not engines or any(not re.fullmatch(r"hf|vllm(@[\w,-]+)?", e) for e in engines) or len(set(engines)) < len(engines):
        p.error(f"--engines takes vllm and/or hf, e.g. 'vllm,hf', and vLLM variants on other CPU cores "
                f"(EngineConfig.cpu_cores), e.g. 'vllm@auto,vllm@all,hf'; got {a.engines!r}.")
    if a.users < 1 or a.requests_per_user < 1 or a.max_tokens < 1 or a.repeats < 1 or a.promotions < 1:
        p.error("--users, --requests-per-user, --max-tokens, --repeats and --promotions must be at least 1.")
    app_clients = tuple(c.strip() for c in a.app_clients.split(",") if c.strip())
    if not app_clients or any(c not in ("gradio", "http") for c in app_clients) or len(set(app_clients)) < len(app_clients):
        p.error(f"--app-clients takes gradio and/or http, e.g. 'gradio,http'; got {a.app_clients!r}.")
    if a.promotion_only and (a.skip_app or a.skip_promotion):
        p.error("--promotion-only runs (c), which needs the app: drop --skip-app / --skip-promotion.")
    return BenchConfig(model=a.model, tiny=a.tiny, users=a.users, requests_per_user=a.requests_per_user,
                       max_tokens=a.max_tokens, temperature=a.temperature, engines=engines,
                       frequency_penalty=a.frequency_penalty, min_p=a.min_p,
                       app_engine=a.app_engine, skip_app=a.skip_app, skip_promotion=a.skip_promotion,
                       promotion_timeout_s=a.promotion_timeout, app_concurrency=a.app_concurrency,
                       repeats=a.repeats, promotion_only=a.promotion_only, promotions=a.promotions,
                       max_loras=a.max_loras, app_clients=app_clients)


if __name__ == "__main__":  # vLLM starts its engine process: keep it under the main guard
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run(parse_args())
