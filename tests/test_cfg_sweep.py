"""benchmarks/digits_cfg_sweep.py: its job runner (parallel, in dependency order, resumable, stops on a
failure) and its choice of each run's best cfg."""
import os
import sys
import time

import pytest

from benchmarks import digits_cfg_sweep as sweep


def _job(tmp_path, name, deps=(), seconds=0.3, fail=False):
    """A job that records when it ran and leaves its name as a file (its 'done' mark)."""
    mark = tmp_path / name
    code = (f"import time; t = time.time(); time.sleep({seconds}); "
            + ("raise SystemExit(3)" if fail else f"open({str(mark)!r}, 'w').write(f'{{t}} {{time.time()}}')"))
    return (name, mark.exists, lambda: [sys.executable, "-c", code], list(deps))


def _span(tmp_path, name):
    return tuple(map(float, (tmp_path / name).read_text().split()))


def test_jobs_run_two_at_a_time_after_what_they_wait_for_and_resume(tmp_path):
    job_list = [_job(tmp_path, "a"), _job(tmp_path, "b"), _job(tmp_path, "c", deps=["a", "b"])]
    seconds = sweep.run_jobs(job_list, parallel=2, log_dir=tmp_path / "logs")
    assert set(seconds) == {"a", "b", "c"}
    (a0, a1), (b0, b1), (c0, _) = (_span(tmp_path, n) for n in "abc")
    assert a0 < b1 and b0 < a1  # a and b overlapped
    assert c0 >= max(a1, b1)  # c waited for both
    assert sweep.run_jobs(job_list, parallel=2, log_dir=tmp_path / "logs") == {}  # all done: nothing runs


def test_a_failed_job_stops_the_run_and_its_dependents_never_start(tmp_path):
    job_list = [_job(tmp_path, "bad", fail=True), _job(tmp_path, "after", deps=["bad"])]
    with pytest.raises(SystemExit, match="bad failed \\(exit 3\\)"):
        sweep.run_jobs(job_list, parallel=2, log_dir=tmp_path / "logs")
    assert not (tmp_path / "after").exists()
    assert os.path.isfile(tmp_path / "logs" / "bad.log")


def test_one_at_a_time_when_asked(tmp_path):
    job_list = [_job(tmp_path, "a"), _job(tmp_path, "b")]
    t0 = time.time()
    sweep.run_jobs(job_list, parallel=1, log_dir=tmp_path / "logs")
    (a0, a1), (b0, b1) = _span(tmp_path, "a"), _span(tmp_path, "b")
    assert a1 <= b0 or b1 <= a0
    assert time.time() - t0 >= 0.6


def test_best_is_the_lowest_fd_among_accurate_enough_cfgs():
    pts = [{"cfg": 1.0, "accuracy": 0.90, "fd": 5.0, "fd_over_floor": 1.2},
           {"cfg": 2.0, "accuracy": 0.96, "fd": 9.0, "fd_over_floor": 2.2},
           {"cfg": 3.0, "accuracy": 0.99, "fd": 8.0, "fd_over_floor": 1.9}]
    b = sweep.best(pts)
    assert b["cfg"] == 3.0 and b["meets_target"]
    b = sweep.best(pts[:2])
    assert b["cfg"] == 2.0 and not b["meets_target"]  # accurate enough but FD over 2x the floor
    b = sweep.best([pts[0]])
    assert b["cfg"] == 1.0 and not b["meets_target"]  # none accurate enough: the most accurate
