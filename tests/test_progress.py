"""Progress off a terminal: a log gets a plain line each tenth of the way, not a bar drawn at the end."""

from __future__ import annotations

from cnnmod.progress import progress_bar


def test_off_a_terminal_progress_is_a_line_per_tenth(monkeypatch, capsys):
    monkeypatch.delenv("CNNMOD_NO_PROGRESS", raising=False)
    with progress_bar("train cnn", total=40) as advance:
        for i in range(40):
            advance(1, epoch=f"{i // 8 + 1}/5")
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 10
    assert lines[0].startswith("train cnn: 4/40 (10%)  epoch 1/5")
    assert lines[-1].startswith("train cnn: 40/40 (100%)  epoch 5/5")


def test_progress_stays_silent_when_disabled(monkeypatch, capsys):
    monkeypatch.setenv("CNNMOD_NO_PROGRESS", "1")
    with progress_bar("train cnn", total=10) as advance:
        for _ in range(10):
            advance(1)
    assert capsys.readouterr().err == ""


def test_fractional_steps_are_counted_in_whole_units(monkeypatch, capsys):
    """Work that advances by parts of a unit (an epoch's share of the batches) reads as whole counts."""
    monkeypatch.delenv("CNNMOD_NO_PROGRESS", raising=False)
    with progress_bar("scale", total=20) as advance:
        for _ in range(67):
            advance(20 / 67)
    lines = capsys.readouterr().err.strip().splitlines()
    counts = [line.split(": ")[1].split(" ")[0] for line in lines]
    assert counts[-1] == "20/20" and all(c.split("/")[0].isdigit() for c in counts), counts
