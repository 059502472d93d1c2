"""The best-thread ceiling of `taxonomist benchmark`, its targets and the predict timing it reports: the
choices on hand-made figures (a fake ceiling whose img/s depends on the thread count it runs at), plus one
tiny real run for the wiring."""
from __future__ import annotations

import pytest
import torch

from taxonomist.benchmark import BenchmarkConfig, format_table, run_benchmark
from taxonomist.benchmark import run as bench_run
from taxonomist.benchmark.pipeline import predict_rate
from taxonomist.benchmark.run import ceiling_thread_counts, check_targets
from taxonomist.cli.main import main
from taxonomist.errors import ConfigError
from taxonomist.runtime import cpu_threads_for
from taxonomist.utils.system import usable_cores

TINY = {"model": "test_efficientnet", "device": "cpu", "image_size": 32, "batch_size": 4, "steps": 2, "warmup": 1,
        "num_workers": 0, "decision_images": 50, "decision_candidates": 20}


def test_ceiling_is_the_best_of_the_thread_counts_and_taxonomist_runs_at_the_policy(monkeypatch):
    """Train img/s grows with threads (best at 3), predict shrinks (best at 1): the ceiling of each is the
    max over the counts tried, in every round and pooled; taxonomist runs at the project's count."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    from taxonomist import runtime
    monkeypatch.setattr(runtime, "busy_cores", lambda: 0)  # the policy is under test, not this machine's load
    seen = {"ceiling": [], "taxonomist": []}

    def fake_train(*a, **k):
        seen["ceiling"].append(torch.get_num_threads())
        return 10.0 * torch.get_num_threads()

    def fake_predict(*a, **k):
        return 120.0 / torch.get_num_threads()

    real_taxonomist_train = bench_run.taxonomist_train

    def spy_taxonomist_train(*a, **k):
        seen["taxonomist"].append(torch.get_num_threads())
        return real_taxonomist_train(*a, **k)

    monkeypatch.setattr(bench_run, "ceiling_train", fake_train)
    monkeypatch.setattr(bench_run, "ceiling_predict", fake_predict)
    monkeypatch.setattr(bench_run, "taxonomist_train", spy_taxonomist_train)
    torch.set_num_threads(1)
    result = run_benchmark(BenchmarkConfig(**TINY, rounds=2, baseline=False, ceiling_threads="3,1,2"),
                           log=lambda *_: None)
    assert torch.get_num_threads() == 1  # the caller's count is back
    assert seen["ceiling"] == [1, 2, 3, 1, 2, 3]
    policy = cpu_threads_for(usable_cores(), 0)
    assert result["torch_threads"] == policy and seen["taxonomist"] == [policy, policy]
    assert result["ceiling_threads_tried"] == [1, 2, 3]
    train, predict = result["train"], result["predict"]
    assert train["ceiling_by_threads"] == {"1": 10.0, "2": 20.0, "3": 30.0}
    assert train["ceiling_img_s"] == 30.0 and train["ceiling_threads"] == 3
    assert predict["ceiling_by_threads"] == {"1": 120.0, "2": 60.0, "3": 40.0}
    assert predict["ceiling_img_s"] == 120.0 and predict["ceiling_threads"] == 1
    for rd in result["per_round"]:
        assert rd["train"]["ceiling_img_s"] == 30.0 and rd["train"]["ceiling_threads"] == 3
        assert rd["predict"]["ceiling_img_s"] == 120.0 and rd["predict"]["ceiling_threads"] == 1
    assert train["vs_ceiling"] == pytest.approx(train["taxonomist_img_s"] / 30.0, rel=0.01)
    t = result["targets"]
    assert t["train_vs_ceiling"]["ratio"] == train["vs_ceiling"]
    assert t["train_vs_ceiling"]["met"] == (train["vs_ceiling"] >= 0.9)
    assert t["train_vs_baseline"] == {"target": "train ≥ 1.0× baseline", "at_least": 1.0, "ratio": None,
                                      "met": None}  # --skip-baseline: not measured
    table = format_table(result)
    assert "train ceiling by thread count: 1 thread 10, 2 threads 20, 3 threads 30 img/s → best at 3" in table
    assert "predict ceiling by thread count: 1 thread 120, 2 threads 60, 3 threads 40 img/s → best at 1" in table
    assert "not measured" in table


def test_pooled_ceiling_is_one_thread_count_over_all_rounds(monkeypatch):
    """Round 1 is best at 1 thread, round 2 at 2: the pooled ceiling is the best *fixed* count over the
    rounds (what a policy could reach), not the pool of each round's best."""
    calls = iter([100.0, 10.0, 100.0, 400.0])  # round 1: 1 → 100, 2 → 10; round 2: 1 → 100, 2 → 400
    monkeypatch.setattr(bench_run, "ceiling_train", lambda *a, **k: next(calls))
    monkeypatch.setattr(bench_run, "ceiling_predict", lambda *a, **k: 50.0)
    result = run_benchmark(BenchmarkConfig(**TINY, rounds=2, baseline=False, ceiling_threads="1,2"),
                           log=lambda *_: None)
    by = result["train"]["ceiling_by_threads"]
    assert by == {"1": 100.0, "2": pytest.approx(2 / (1 / 10 + 1 / 400), rel=1e-3)}  # 19.51: pooled per count
    assert result["train"]["ceiling_img_s"] == 100.0 and result["train"]["ceiling_threads"] == 1
    assert [rd["train"]["ceiling_threads"] for rd in result["per_round"]] == [1, 2]


def test_ceiling_thread_counts_reads_the_option():
    assert ceiling_thread_counts("all", 2, 2) == [1, 2]
    assert ceiling_thread_counts("ALL", 1, 1) == [1]
    assert ceiling_thread_counts("max", 16, 12) == [16]
    assert ceiling_thread_counts("policy", 16, 12) == [12]
    assert ceiling_thread_counts(" 4,1, 2 ", 2, 2) == [1, 2, 4]  # more than the cores is allowed: oversubscription
    for bad in ("0", "1,-1", "two", "", "1,,2"):
        with pytest.raises(ConfigError, match="--ceiling-threads"):
            ceiling_thread_counts(bad, 2, 2)


def test_bad_ceiling_threads_is_one_error_line_before_any_work(capsys):
    assert main(["benchmark", "--device", "cpu", "--ceiling-threads", "1,x"]) == 2
    assert capsys.readouterr().err.startswith("error: benchmark --ceiling-threads '1,x'")


def test_targets_per_device():
    parts = {"train": {"vs_ceiling": 0.8999, "vs_baseline": 1.0}, "predict": {"vs_ceiling": 0.95}}
    cpu = check_targets(parts, "cpu")
    assert [(k, v["ratio"], v["met"]) for k, v in cpu.items()] == [
        ("train_vs_ceiling", 0.8999, False), ("train_vs_baseline", 1.0, True), ("predict_vs_baseline", None, None)]
    cuda = check_targets(parts, "cuda")
    assert {k: v["at_least"] for k, v in cuda.items()} == {
        "train_vs_ceiling": 0.9, "predict_vs_ceiling": 0.9, "train_vs_baseline": 2.0, "predict_vs_baseline": 2.0}
    assert cuda["predict_vs_ceiling"]["met"] is True and cuda["train_vs_baseline"]["met"] is False


def test_format_table_prints_targets_threads_and_predict_timing():
    fig = {"ceiling_img_s": 13.65, "ceiling_threads": 2, "ceiling_by_threads": {"1": 7.39, "2": 13.65},
           "taxonomist_img_s": 13.78, "baseline_img_s": 12.74, "vs_ceiling": 1.01, "vs_baseline": 1.082}
    predict = {**fig, "timing": {"method": "steady_state", "per_round": ["steady_state"], "reason": "why"}}
    result = {"model": "m", "image_size": 8, "batch_size": 2, "device": "cpu: X", "train": fig, "predict": predict,
              "decision": {"images": 10, "candidates": 5, "seconds": 0.1}, "peak_rss_mb": 1.0,
              "peak_device_mb": 1.0, "torch_threads": 2, "torch_threads_rule": "rule", "baseline_torch_threads": 2,
              "targets": check_targets({"train": fig, "predict": {"vs_baseline": 0.5}}, "cpu")}
    text = format_table(result)
    assert "torch threads: taxonomist 2 (rule), baseline 2" in text
    assert "train ceiling by thread count: 1 thread 7.39, 2 threads 13.65 img/s → best at 2" in text
    assert "predict timed as steady_state (steady_state per round): why" in text
    lines = text.splitlines()
    assert any("train ≥ 0.9× ceiling" in ln and "1.01×" in ln and ln.endswith(" met") for ln in lines)
    assert any("predict ≥ 1.0× baseline" in ln and "0.50×" in ln and ln.endswith("NOT met") for ln in lines)


def test_predict_rate_says_how_it_timed():
    # 3 timed batches of 32 after 1 warm-up: 4.0 s for all, 1.5 s for the warm-up alone
    t = predict_rate(96, 128, 4.0, 1.5)
    assert (t.method, t.img_s, t.warm_s, t.all_s) == ("steady_state", 96 / 2.5, 1.5, 4.0)
    assert "cancels out" in t.reason
    # a difference under a tenth of the call is noise: the whole call, start included (a lower bound)
    t = predict_rate(96, 128, 4.0, 3.7)
    assert (t.method, t.img_s) == ("whole_call", 32.0) and "within noise" in t.reason
    t = predict_rate(96, 128, 4.0, 4.2)  # the warm-up alone took longer (load): never a negative rate
    assert (t.method, t.img_s) == ("whole_call", 32.0)
    t = predict_rate(96, 96, 3.0, None)  # --warmup 0
    assert (t.method, t.img_s, t.warm_s) == ("whole_call", 32.0, None) and "--warmup 0" in t.reason
    assert t.as_dict() == {"method": "whole_call", "reason": t.reason, "all_s": 3.0, "warm_s": None}


def test_predict_timing_is_in_the_json_and_the_log(monkeypatch):
    monkeypatch.setattr(bench_run, "ceiling_train", lambda *a, **k: 10.0)
    monkeypatch.setattr(bench_run, "ceiling_predict", lambda *a, **k: 10.0)
    messages: list[str] = []
    result = run_benchmark(BenchmarkConfig(**{**TINY, "warmup": 0}, baseline=False, ceiling_threads="1"),
                           log=messages.append)
    timing = result["predict"]["timing"]
    assert timing["method"] == "whole_call" and timing["per_round"] == ["whole_call"]
    assert "--warmup 0" in timing["reason"]
    assert result["per_round"][0]["predict"]["timing"]["warm_s"] is None
    assert any(m.startswith("round 1/1: predict timed as whole_call: no warm-up batches") for m in messages)
