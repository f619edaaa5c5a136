"""scripts/bench_sessions.py on the app's real page: both holders measured, the lean one renders nothing."""

from __future__ import annotations

import pytest

from scripts.bench_sessions import main


def test_the_benchmark_measures_both_holders_on_the_real_page(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--sessions", "20", "--repeats", "2"])
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line[:1].isdigit()]
    assert [(r[0], r[-3]) for r in rows] == [("1", "(stock)"), ("1", "lean"), ("2", "(stock)"), ("2", "lean")]
    stock_kib = [float(r[-1]) for r in rows if r[-3] == "(stock)"]
    lean_kib = [float(r[-1]) for r in rows if r[-3] == "lean"]
    assert min(stock_kib) > 10 * max(lean_kib)  # the stock holder keeps every block's config per session
    assert "lean / stock CPU per new session" in out and "lean / stock memory per new session" in out
    with pytest.raises(SystemExit):
        main(["--sessions", "0"])
