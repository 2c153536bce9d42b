"""Progress in a log: off a terminal every long step prints a plain line at every further 10 %
and at least every 30 s (done/total, rate, ETA), and ``--quiet`` silences it (issue 31,
item 3)."""
from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from pteenet.progress import LogProgress, bar
from tests._helpers import write_images


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_line_every_tenth_and_at_the_end():
    out, clock = io.StringIO(), _Clock()
    with LogProgress(out, delay=5, clock=clock) as p:
        task = p.add_task("backbone features", total=1000)
        for _ in range(100):
            clock.now += 0.5
            p.advance(task, 10)
        p.advance(task, 10)  # past the end: nothing more
    lines = out.getvalue().splitlines()
    assert len(lines) == 10, lines
    assert lines[0] == "backbone features: 100/1,000 (10%), 20 img/s, ETA 0:45"
    assert lines[-1] == "backbone features: 1,000/1,000 (100%), 20 img/s, in 0:50"


def test_a_line_every_30_seconds_of_a_slow_step_with_its_info():
    out, clock = io.StringIO(), _Clock()
    p = LogProgress(out, delay=0, clock=clock)
    task = p.add_task("training", total=10_000)
    for _ in range(4):
        clock.now += 31
        p.update(task, advance=1, info="loss 0.512")
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and lines[0].startswith("training: 1/10,000 (0%), 0 img/s, ETA ")
    assert lines[0].endswith(", loss 0.512")


def test_a_step_done_within_the_delay_prints_nothing():
    """So a command that fails after a quick step still ends in its one-line error."""
    out, clock = io.StringIO(), _Clock()
    p = LogProgress(out, delay=5, clock=clock)
    quick = p.add_task("calibration features", total=6)
    clock.now += 1
    p.advance(quick, 6)
    slow = p.add_task("training", total=100)
    for _ in range(10):
        clock.now += 1
        p.advance(slow, 1)
    lines = out.getvalue().splitlines()
    assert [ln.split(":")[0] for ln in lines] == ["training"]  # from 5 s on, at once
    assert lines[0].startswith("training: 5/100 (5%)")


def test_off_a_terminal_the_bar_is_the_log_one(monkeypatch):
    assert isinstance(bar(True), LogProgress)  # pytest's captured stderr is no terminal
    assert not isinstance(bar(False), LogProgress)


@pytest.mark.parametrize("quiet", [False, True])
def test_a_piped_bench_logs_its_progress(shared, tmp_path, quiet):
    """``pteenet bench ... > log 2>&1`` in a real subprocess: the measuring and timing steps'
    lines are in the file (none with --quiet)."""
    import shutil

    data, _, bundle = shared
    bundle = Path(shutil.copytree(bundle, tmp_path / "b"))
    more = write_images(tmp_path / "more", per_class=20, splits=("test",))
    log = tmp_path / "bench.log"
    args = ["bench", "--bundle", str(bundle), "--data", str(more), "--batch-size", "4",
            "--latency-samples", "4", "--repeats", "1", "--no-profile",
            *(["--quiet"] if quiet else [])]
    code = ("import pteenet.progress as p\np.LOG_DELAY_SECONDS = 0  # this step is quick\n"
            f"from pteenet_cli.app import main\nimport sys\nsys.argv = ['pteenet', *{args!r}]\n"
            "main()\n")
    with log.open("w") as f:
        r = subprocess.run([sys.executable, "-c", code], stdout=f, stderr=subprocess.STDOUT,
                           timeout=600)
    text = log.read_text()
    assert r.returncode == 0, text
    lines = [ln for ln in text.splitlines() if ln.startswith("measuring: ")]
    timing = [ln for ln in text.splitlines() if ln.startswith("timing: ")]
    if quiet:
        assert lines == [] and timing == []
        return
    assert timing and "(100%)" in timing[-1], text
    assert len(lines) >= 5, text
    assert lines[-1].startswith("measuring: 60/60 (100%)") and "img/s, in " in lines[-1]
    assert "ETA" in lines[0] and "/60 (" in lines[0]
