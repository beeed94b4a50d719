"""The benchmark command: standard errors, the table and the JSON against closed forms, the masked
rows of the MLM score, the checks of its flags, and one --quick run on a tiny export (of the
session's tiny pretraining run) that a rerun reads back."""
import dataclasses
import json
import math
import os
import types

import numpy as np
import pytest

from objectives.checks import ConfigError
from pretrain import benchmark
from pretrain.finetune import bench_scores, code_tasks, heldout_mlm
from tests import e2e


def test_standard_errors_match_their_closed_forms():
  assert bench_scores.accuracy_se(0.8, 100) == pytest.approx(0.04)
  assert bench_scores.accuracy_se(0.5, 400) == pytest.approx(0.025)
  assert bench_scores.accuracy_se(1.0, 7) == 0.0
  rr = bench_scores.reciprocal_ranks([1, 1, 2, 20])  # Beyond rank 10 counts 0.
  np.testing.assert_allclose(rr, [1, 1, 0.5, 0])
  mean = 2.5 / 4
  sample_var = sum((x - mean) ** 2 for x in (1, 1, 0.5, 0)) / 3
  assert bench_scores.mean_se(rr) == pytest.approx(math.sqrt(sample_var / 4))
  row = bench_scores.mrr_row("r", rr, np.zeros(4), np.ones(4))
  assert (row.n, row.model, row.gain, row.reference, row.reference_se) == (4, mean, mean, 1, 0)
  acc = bench_scores.accuracy_row("t", 100, 0.8, 0.7, 0.5, "majority class")
  assert (acc.model_se, acc.reference_se) == (pytest.approx(0.04), pytest.approx(0.05))
  assert acc.control_se == pytest.approx(math.sqrt(0.7 * 0.3 / 100))
  assert acc.gain == pytest.approx(0.1)
  assert acc.gain_se == pytest.approx(math.sqrt(0.04 ** 2 + 0.21 / 100))


ROWS = [bench_scores.accuracy_row("exception_type", 100, 0.8, 0.7, 0.5, "majority class"),
        bench_scores.mrr_row("docstring_retrieval", bench_scores.reciprocal_ranks([1, 1, 2, 20]),
                             np.zeros(4), np.ones(4), "BM25", note="4 candidates"),
        bench_scores.skipped_row("mlm", "accuracy", "skipped: a Hugging Face directory")]


def test_the_table_and_the_json_hold_the_same_rows():
  assert bench_scores.table(ROWS) == "\n".join([
      "| task | metric | n | model | control (random init) | gain | reference | s.e. (model) |",
      "|---|---|---|---|---|---|---|---|",
      "| exception_type | accuracy | 100 | 0.800 | 0.700 | +0.100 | 0.500 (majority class) | 0.040 |",
      "| docstring_retrieval | MRR@10 | 4 | 0.625 | 0.000 | +0.625 | 1.000 (BM25) | 0.239 |",
      "| mlm | accuracy | - | - | - | - | - | - |",
      "",
      "- docstring_retrieval: 4 candidates",
      "- mlm: skipped: a Hugging Face directory"])
  data = json.loads(bench_scores.to_json(ROWS, model="m", quick=True))
  assert (data["model"], data["quick"]) == ("m", True)
  first, second, skipped = data["rows"]
  assert first == {"task": "exception_type", "metric": "accuracy", "n": 100, "model": 0.8,
                   "control": 0.7, "reference": 0.5, "reference_name": "majority class",
                   "model_se": pytest.approx(0.04), "control_se": pytest.approx(0.0458258, 1e-5),
                   "reference_se": pytest.approx(0.05), "note": "", "gain": pytest.approx(0.1),
                   "gain_se": pytest.approx(0.0608276, 1e-5)}
  assert second["model_se"] == pytest.approx(0.2393568, 1e-6) and second["n"] == 4
  assert skipped["model"] is None and skipped["gain"] is None and skipped["note"].startswith("skipped")
  nan = bench_scores.Row("x", "accuracy", 1, 1.0, model_se=float("nan"))
  assert json.loads(bench_scores.to_json([nan]))["rows"][0]["model_se"] is None  # Valid JSON.


class _Tokenizer:
  """Characters -> ids 5 + ord % 50; our reserved ids and a 64-id vocabulary."""
  pad_id, cls_id, sep_id, mask_id, first_ordinary_id, vocab_size = 0, 2, 3, 4, 5, 64

  def encode_batch(self, texts):
    return [[5 + ord(ch) % 50 for ch in t] for t in texts]


def test_masked_rows_mask_the_same_share_of_ordinary_tokens_for_every_model():
  tok = _Tokenizer()
  texts = ["abcdefghij" * 7, "short", "klmnopqrst" * 2]
  rows = heldout_mlm.masked_rows(tok, texts, seq_len=32, max_rows=100, seed=0)
  # 70 ids -> chunks of 30, 30, 10; "short" (< 8 ids) is dropped; 20 ids -> one row.
  lengths = rows.segment_ids.sum(1)
  assert list(lengths) == [32, 32, 12, 22]
  assert np.all(rows.original[:, 0] == tok.cls_id)
  assert [int(w.sum()) for w in rows.weights] == [round(0.15 * (n - 2)) for n in lengths]
  for r in range(4):
    slots = rows.positions[r, rows.weights[r] > 0]
    assert len(set(slots)) == len(slots) and slots.min() >= 1 and slots.max() <= lengths[r] - 2
    np.testing.assert_array_equal(rows.targets[r, :len(slots)], rows.original[r, slots])
    unmasked = np.setdiff1d(np.arange(32), slots)
    np.testing.assert_array_equal(rows.input_ids[r, unmasked], rows.original[r, unmasked])
  again = heldout_mlm.masked_rows(tok, texts, seq_len=32, max_rows=100, seed=0)
  assert all(np.array_equal(a, b) for a, b in zip(rows, again))
  assert len(heldout_mlm.masked_rows(tok, texts, seq_len=32, max_rows=2).input_ids) == 2
  # The reference: always the most frequent ordinary id of the rows.
  tokens = rows.original[rows.segment_ids > 0]
  top = np.bincount(tokens[tokens >= 5]).argmax()
  expected = np.sum((rows.targets == top) * rows.weights) / rows.weights.sum()
  assert heldout_mlm.unigram_accuracy(rows, tok) == pytest.approx(expected)


def test_flags_are_checked_before_anything_runs(tmp_path):
  assert benchmark.parse_tasks("mlm, exception_type") == ["exception_type", "mlm"]
  with pytest.raises(ConfigError, match=r"--tasks='exception,mlm': unknown task 'exception'"):
    benchmark.parse_tasks("exception,mlm")
  with pytest.raises(ConfigError, match="--tasks='': no task"):
    benchmark.parse_tasks("")
  with pytest.raises(FileNotFoundError, match="--model=.*nope: no such directory"):
    benchmark.run_benchmark(str(tmp_path / "nope"), workdir=str(tmp_path / "w"))
  model = tmp_path / "m"
  model.mkdir()
  with pytest.raises(FileNotFoundError, match="--json=.*the directory .*missing does not exist"):
    benchmark.check_paths(str(model), str(tmp_path / "w"), str(tmp_path / "missing" / "o.json"))
  (tmp_path / "file").write_text("")
  with pytest.raises(FileExistsError, match="--workdir=.*file is a file"):
    benchmark.check_paths(str(model), str(tmp_path / "file"), "")
  with pytest.raises(ConfigError, match="--pooler='sum'"):
    benchmark.run_benchmark(str(model), workdir=str(tmp_path / "w"), pooler="sum")
  with pytest.raises(ConfigError, match="--finetune_steps=-3: negative"):
    benchmark.run_benchmark(str(model), workdir=str(tmp_path / "w"), finetune_steps=-3)
  assert sorted(os.listdir(tmp_path)) == ["file", "m"]
  assert benchmark.default_workdir("exports/demo/") == os.path.join("workdir", "benchmark", "demo")
  hf = types.SimpleNamespace(padded_vocab_size=8)
  assert heldout_mlm.head_fits(hf, {"bias": np.zeros(8)})
  assert not heldout_mlm.head_fits(hf, {"bias": np.zeros(12)})  # ERNIE-Gram's joint head.


def test_finetune_steps_scale_the_recipe_schedule_and_quick_evaluates_once():
  longer = dataclasses.replace(benchmark.FULL, steps=900)
  c = benchmark.finetune_config("swapped_operands_localization", "m", scratch=False,
                                budget=longer, seed=0, cache_dir="c")
  assert (c.task.head, c.train.steps, c.optimizer.warmup_steps) == ("locate", 900, 90)
  assert c.train.eval_every == c.train.checkpoint_every == 225  # The recipe's four evaluations.
  quick = benchmark.finetune_config("exception_type", "m", scratch=True, budget=benchmark.QUICK,
                                    seed=0, cache_dir="c")
  assert quick.train.steps == quick.train.eval_every == quick.train.checkpoint_every == 6
  assert quick.train.log_every == 6


def test_finetune_steps_reach_the_fine_tuning_budget(tmp_path, monkeypatch):
  budgets = []

  def localization_row(task, init, workdir, budget, seed, cache_dir):
    budgets.append(budget)
    return bench_scores.skipped_row(task, "localization accuracy", "recorded")

  monkeypatch.setattr(benchmark, "load_model", lambda path: None)
  monkeypatch.setattr(benchmark, "localization_row", localization_row)
  model = tmp_path / "m"
  model.mkdir()
  for steps, quick in ((900, False), (0, False), (40, True)):
    benchmark.run_benchmark(str(model), ["swapped_operands_localization"], quick=quick,
                            workdir=str(tmp_path / "w"), finetune_steps=steps)
  assert [(b.steps, b.evaluate_once) for b in budgets] == [(900, False), (None, False), (40, True)]


@pytest.fixture(scope="module")
def tiny_export(runs, tmp_path_factory):
  """The export of the session's tiny MLM pretraining run (tests/conftest.py's `runs`)."""
  out = tmp_path_factory.mktemp("benchmark") / "export"
  e2e.run("pretrain.export", f"--workdir={runs[0]}", f"--out={out}")
  return out


def test_quick_benchmark_of_a_tiny_export_and_its_rerun(tiny_export, tmp_path):
  out, workdir = tmp_path / "out.json", tmp_path / "runs"
  flags = [f"--model={tiny_export}", "--quick", f"--workdir={workdir}",
           f"--cache_dir={tmp_path / 'cache'}"]
  proc = e2e.run("pretrain.benchmark", *flags, "--tasks=swapped_operands,docstring_retrieval,mlm",
                 f"--json={out}")
  print(proc.stdout[-1500:])
  data = json.loads(out.read_text())
  assert data["quick"] and data["budget"]["max_files"] == benchmark.QUICK.max_files
  swapped, retrieved, mlm = data["rows"]
  test = code_tasks.finetune_splits("swapped_operands", max_files=benchmark.QUICK.max_files)["test"]
  assert swapped["task"] == "swapped_operands" and swapped["n"] == len(test)
  assert swapped["reference"] == 0.5 and swapped["reference_name"] == "majority class"
  for key in ("model", "control"):
    p = swapped[key]
    assert 0 <= p <= 1 and swapped[f"{key}_se"] == pytest.approx(math.sqrt(p * (1 - p) / len(test)))
  queries, candidates, _ = code_tasks.docstring_retrieval(max_files=benchmark.QUICK.max_files)
  assert retrieved["n"] == len(queries) and f"{len(candidates)} candidates" in retrieved["note"]
  assert retrieved["reference_name"] == "BM25" and retrieved["reference"] > retrieved["model"]
  assert mlm["task"] == "mlm" and mlm["n"] > 50 and 0 <= mlm["model"] <= 1
  assert mlm["reference_name"] == "most frequent token"
  table = proc.stdout[proc.stdout.index("| task |"):]
  assert table.splitlines()[2].startswith(f"| swapped_operands | accuracy | {len(test)} | ")
  for run in ("model", "control"):
    assert (workdir / "swapped_operands" / run / "results.json").is_file()
  # A rerun reads both finished fine-tuning runs back and prints the same row.
  again = e2e.run("pretrain.benchmark", *flags, "--tasks=swapped_operands")
  assert again.stdout.count("Read back") == 2 and "Fine-tuning" not in again.stdout
  assert table.splitlines()[2] in again.stdout
  # A bad flag is one error line and status 2, before anything runs.
  bad = e2e.run("pretrain.benchmark", *flags, "--tasks=swapped", check=False)
  assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith(
      "error: --tasks='swapped': unknown task 'swapped'")


def test_probe_benchmark_scores_frozen_features_of_model_and_control(tiny_export, tmp_path):
  out = tmp_path / "probe.json"
  proc = e2e.run("pretrain.benchmark", f"--model={tiny_export}", "--quick", "--probe",
                 f"--workdir={tmp_path / 'runs'}", f"--cache_dir={tmp_path / 'cache'}",
                 "--tasks=docstring_match", f"--json={out}")
  data = json.loads(out.read_text())
  assert data["probe"] and data["probe_budget"]["max_train"] == benchmark.PROBE_QUICK.max_train
  for row in data["rows"]:
    assert row["n"] == benchmark.PROBE_QUICK.max_test and "linear probe" in row["note"]
    assert 0 <= row["model"] <= 1 and 0 <= row["control"] <= 1 and row["reference"] <= 0.75
  assert not (tmp_path / "runs").exists()  # Probes fine-tune nothing.
  assert "| docstring_match | accuracy | 48 |" in proc.stdout


def test_probe_benchmark_of_a_hugging_face_directory(tmp_path):
  from configs import code_pairs  # pylint: disable=import-outside-toplevel
  out = tmp_path / "minilm.json"
  proc = e2e.run("pretrain.benchmark", f"--model={code_pairs.minilm_dir()}", "--quick", "--probe",
                 f"--cache_dir={tmp_path / 'cache'}", f"--workdir={tmp_path / 'runs'}",
                 "--tasks=docstring_retrieval,mlm", f"--json={out}")
  retrieved, mlm = json.loads(out.read_text())["rows"]
  # A trained sentence encoder retrieves docstrings -> code far better than its random init.
  assert retrieved["model"] > retrieved["control"] + 0.1, proc.stdout[-2000:]
  assert mlm["model"] is None and "Hugging Face directory" in mlm["note"]
