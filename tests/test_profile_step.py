"""bench/profile_step.py's wall-time attribution, on intervals whose answer is known."""
import pytest

from bench import profile_step


def test_work_beside_a_matmul_is_the_matmul_s_and_overlaps_are_split():
  out = profile_step.exposed([(0, 10, "matmul", 0), (5, 10, "elementwise", 0),
                              (20, 4, "reduction", 0), (22, 4, "layout", 0)], 0, 26)
  assert out["matmul"] == 10 and out["elementwise"] == 5
  assert out["reduction"] == pytest.approx(3) and out["layout"] == pytest.approx(3)
  assert out["idle"] == 5 and out["async dot"] == 0  # 15-20


def test_an_async_dot_covers_the_following_gaps_for_its_work_then_idle_begins():
  # Two dots launched at 0 and 1 (1 us launch events) with 30 and 20 us of work, one after the
  # other: the queue runs out at 50. Gaps 2-10 and 12-40 are covered, 42-60 up to 50.
  out = profile_step.exposed([(0, 1, "matmul", 30), (1, 1, "matmul", 20),
                              (10, 2, "elementwise", 0), (40, 2, "elementwise", 0),
                              (60, 1, "elementwise", 0)], 0, 61)
  assert out["async dot"] == pytest.approx(8 + 28 + 8)
  assert out["idle"] == pytest.approx(10)
  assert out["matmul"] == 2 and out["elementwise"] == 5
  assert sum(out.values()) == pytest.approx(61)
