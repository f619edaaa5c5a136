"""The stream pacer: one stream updates every 50 ms at most; many streams share ~40 updates a second; the first
update, the first text and the last are never held."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from chat_app.ui.common import StreamPacer


@dataclass
class Update:
    text: str
    final: bool = False


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def tokens(clock: Clock, n: int, every_s: float, *, accept_first: bool = True):
    """A reply as the service streams it: an update with no text (the turn was accepted), then a token
    every `every_s`, then the final update."""
    if accept_first:
        yield Update("")
    text = ""
    for i in range(n):
        clock.now += every_s
        text += f"t{i} "
        yield Update(text)
        await asyncio.sleep(0)  # let the other streams run, as the engine's steps do
    yield Update(text, final=True)


async def consume(pacer: StreamPacer, clock: Clock, n: int, every_s: float) -> list[Update]:
    return [u async for u in pacer.paced(tokens(clock, n, every_s), lambda u: u.final, lambda u: bool(u.text))]


def test_a_lone_stream_sends_at_most_one_update_per_50_ms_and_never_holds_the_first_token_or_the_end() -> None:
    clock = Clock()
    pacer = StreamPacer(clock=clock)
    sent = asyncio.run(consume(pacer, clock, n=100, every_s=0.01))  # 1 s of tokens at 100 a second
    assert sent[0].text == "" and sent[1].text == "t0 "  # accepted, then the first token at once
    assert sent[-1].final and sent[-1].text.endswith("t99 ")  # the whole reply, always
    assert 20 <= len(sent) <= 25  # 1 s / 50 ms, plus the first, the first token and the final
    assert pacer.streams == 0


def test_the_first_token_is_sent_even_right_after_the_accepted_update() -> None:
    clock = Clock()
    pacer = StreamPacer(clock=clock, min_interval_s=10.0)
    sent = asyncio.run(consume(pacer, clock, n=5, every_s=0.001))
    assert [u.text for u in sent] == ["", "t0 ", "t0 t1 t2 t3 t4 "]


def test_many_streams_share_the_budget_and_each_waits_longer() -> None:
    clock = Clock()
    pacer = StreamPacer(clock=clock, updates_per_s=40.0)

    async def eight() -> list[list[Update]]:
        # 8 streams, a token each every 10 ms of the shared clock (the clock moves 8 times per round).
        return await asyncio.gather(*(consume(pacer, clock, n=100, every_s=0.01 / 8) for _ in range(8)))

    per_stream = asyncio.run(eight())
    # 1 s of shared time: 8 streams at 8/40 = 0.2 s each send ~5 paced updates, not 20.
    assert all(4 <= len(sent) - 3 <= 7 for sent in per_stream), [len(s) for s in per_stream]
    assert all(sent[-1].final and sent[-1].text.endswith("t99 ") for sent in per_stream)
    assert pacer.streams == 0


def test_the_wait_is_capped_and_a_stream_closed_early_leaves_the_count() -> None:
    pacer = StreamPacer(streams=1000)
    assert pacer.interval_s() == pacer.max_interval_s
    assert StreamPacer().interval_s() == StreamPacer().min_interval_s

    async def stop_early() -> None:
        clock = Clock()
        pacer.streams = 0
        stream = pacer.paced(tokens(clock, 10, 0.01), lambda u: u.final, lambda u: bool(u.text))
        await stream.__anext__()
        assert pacer.streams == 1
        await stream.aclose()  # the user pressed Stop
        assert pacer.streams == 0

    asyncio.run(stop_early())
