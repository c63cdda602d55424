"""bench/eval_mt10.py's pure parts: the world-model-minus-baseline comparison and the --only merge guards."""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import eval_mt10  # noqa: E402


def entry(rates: dict[str, float], episodes: int = 20) -> dict:
    return {"per_task": rates, "detail": {t: {"episodes": episodes} for t in rates}}


def test_difference_pools_the_common_tasks_with_a_standard_error():
    a = entry({"reach-v3": 0.5, "push-v3": 0.3, "door-open-v3": 1.0})
    b = entry({"reach-v3": 0.3, "push-v3": 0.1})
    out = eval_mt10.difference(a, b)
    assert out["tasks"] == ["push-v3", "reach-v3"]  # door-open has no baseline: left out of both sides
    assert out["episodes"] == 40
    assert out["diff"] == pytest.approx(0.2)
    assert out["stderr"] == pytest.approx((0.4 * 0.6 / 40 + 0.2 * 0.8 / 40) ** 0.5, abs=1e-4)
    assert out["per_task"] == {"push-v3": pytest.approx(0.2), "reach-v3": pytest.approx(0.2)}
    assert eval_mt10.difference(a, None) is None
    assert eval_mt10.difference(a, entry({"window-open-v3": 1.0})) is None


def run_main(monkeypatch, *argv: str) -> None:
    monkeypatch.setattr(sys, "argv", ["eval_mt10.py", *argv])
    eval_mt10.main()


def test_only_rejects_an_unknown_part(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        run_main(monkeypatch, "--only", "demos10")
    assert "unknown part(s) ['demos10']" in capsys.readouterr().err


def test_only_refuses_to_merge_into_a_run_on_other_episodes(monkeypatch, tmp_path, capsys):
    out = tmp_path / "eval.json"
    out.write_text(json.dumps({"episodes_per_task": 5, "max_steps": 300, "eval_seed": 1, "mode": "sync",
                               "demos_per_task": 50}))
    with pytest.raises(SystemExit):
        run_main(monkeypatch, "--only", "demos_10", "--out", str(out), "--runs", str(tmp_path))
    assert "rerun every part instead" in capsys.readouterr().err


def test_only_merges_the_named_part_and_keeps_the_rest(monkeypatch, tmp_path):
    # no 10-demo models under --runs: the part is recorded as missing, the 50-demo results are kept untouched
    out = tmp_path / "eval.json"
    kept = {"avg_success": 0.59, **entry({"reach-v3": 0.35})}
    base = {"episodes_per_task": 20, "max_steps": 300, "eval_seed": 1, "mode": "sync", "demos_per_task": 50,
            "world_model": kept, "baseline": entry({"reach-v3": 0.30}), "demos_10": {"demos_per_task": 10}}
    out.write_text(json.dumps(base))
    run_main(monkeypatch, "--only", "demos_10", "--out", str(out), "--runs", str(tmp_path), "--tasks", "reach-v3")
    result = json.loads(out.read_text())
    assert result["world_model"] == kept
    assert result["demos_10"]["world_model"]["missing"] == ["reach-v3"]
    assert "evaluated_at" in result["demos_10"]["baseline"]
    assert result["world_model_minus_baseline"]["diff"] == pytest.approx(0.05)
    assert result["demos_10"]["world_model_minus_baseline"] is None


def test_demos10_suffix_picks_the_suffixed_runs_and_records_it(monkeypatch, tmp_path):
    # a run named with the suffix exists only for the world model: the baseline's is reported missing, by that name
    (tmp_path / "posttrain-reach-v3-demos10-s480" / "model").mkdir(parents=True)
    evaluated = []
    monkeypatch.setattr(eval_mt10, "run", lambda model_dir, task, **kw: evaluated.append(model_dir) or
                        {"success_rate": 0.5, "episodes": 20, "progress": 0.5})
    out = tmp_path / "eval.json"
    (tmp_path / "posttrain-reach-v3-demos10-s480" / "model" / "config.json").write_text("{}")
    run_main(monkeypatch, "--only", "demos_10", "--demos10-suffix=-s480", "--out", str(out), "--runs",
             str(tmp_path), "--tasks", "reach-v3")
    result = json.loads(out.read_text())["demos_10"]
    assert evaluated == [tmp_path / "posttrain-reach-v3-demos10-s480" / "model"]
    assert result["run_suffix"] == "-s480"
    assert result["baseline"]["missing"] == ["reach-v3"] and result["world_model"]["missing"] == []
