"""The fidelity study (benchmarks/fidelity2, issue 15) end to end on the CPU with its smoke preset:
tiny tower, tiny random LM with SmolLM2's tokenizer, every upstream training stage through
`python -m sparsevlm_patch.train`, every evaluation row. ~40 s."""
import dataclasses
import json
import os
import random
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks", "fidelity2"))

import evaluate  # noqa: E402
import study  # noqa: E402
import task  # noqa: E402


def test_task_questions_are_answerable_and_blind_guessing_is_low(tmp_path):
    paths = task.build(str(tmp_path), size=112, n_train=300, n_test=60, turns=5, seed=3)
    with open(paths["test"]) as handle:
        test = json.load(handle)
    assert {r["info"]["split"] for r in test} == {"object", "location"}
    for record in test:
        scene, info = record["scene"], record["info"]
        answer = record["conversations"][1]["value"]
        asked = [scene["objects"][i] for i in info["objects"]]
        if info["type"] == "count":
            assert answer == task.COUNTS[len(asked) - 1]
            assert all(o["shape"] == scene["counted"] for o in asked)
        else:
            assert len(asked) == 1 and answer in (asked[0]["color"], asked[0]["shape"])
        assert task.region_patches(scene, info, 14)
    blind = task.blind_accuracy(paths["train"], test)
    assert max(blind.values()) <= 0.40, blind


def test_region_patches_cover_the_drawn_object():
    scene = task.random_scene(random.Random(0), 336)
    owners = task.patch_labels(scene, 14)
    for index in range(len(scene["objects"])):
        region = set(task.region_patches(scene, {"objects": [index]}, 14))
        drawn = {p for p, o in enumerate(owners) if o == index + 1}
        assert drawn and drawn <= region


def test_scaled_budgets():
    assert [evaluate.scaled_budget(b, 576) for b in evaluate.PAPER_BUDGETS] == [192, 128, 96, 64]
    assert [evaluate.scaled_budget(b, 256) for b in evaluate.PAPER_BUDGETS] == [85, 57, 43, 28]


def test_smoke_pipeline(tmp_path):
    # A first call that stops after the tower (as one without the GGUF does), then the rest resumes.
    first = tmp_path / "first"
    assert study.main(["--preset", "smoke", "--out", str(first), "--work", str(tmp_path / "work"),
                       "--until", "tower"]) == 0
    with open(first / "results.json") as handle:
        assert set(json.load(handle)["phases"]) == {"data", "tower"}
    assert (first / "tower" / "config.json").exists()  # the tower comes back with the call that trained it
    out = tmp_path / "out"
    assert study.main(["--preset", "smoke", "--out", str(out), "--work", str(tmp_path / "work")]) == 0
    with open(out / "results.json") as handle:
        rep = json.load(handle)
    assert not rep["skipped"] and all("error" not in v for v in rep["phases"].values())
    assert len(rep["earlier_calls"]) == 1
    rows = {(e["model"], e["rule"], e["retain"]) for e in rep["evaluations"]}
    low = rep["budgets"][-1]
    expected = {("finetuned", "dense", None)} | {("finetuned", r, b) for r in evaluate.RULES for b in rep["budgets"]}
    expected |= {("distill_sparsevlm", "sparsevlm", low), ("distill_sparsevlm_v2", "sparsevlm_v2", low),
                 ("control", "dense", None), ("control", "sparsevlm", low)}
    assert expected <= rows
    late = {(e["rule"], e["retain"]): e for e in rep["evaluations"] if e.get("pruning_layers")}
    assert set(late) == {(r, low) for r in ("sparsevlm", "sparsevlm_v2", "random")}
    assert all(e["pruning_layers"] == [8, 10, 12] and e["model"] == "finetuned" for e in late.values())
    # Later pruning layers prune less of the prefill: the FLOPs say the layers reached the plugin.
    default = {e["rule"]: e for e in rep["evaluations"] if e["model"] == "finetuned" and e["retain"] == low
               and not e.get("pruning_layers")}
    assert set(default) == set(evaluate.RULES)  # the late rows sit beside the defaults, not over them
    assert all(late[(r, low)]["flops_vs_dense"] > default[r]["flops_vs_dense"] for r in ("sparsevlm", "random"))
    for e in rep["evaluations"]:
        for split in ("object", "location"):
            assert 0.0 <= e[split]["accuracy"] <= 1.0 and e[split]["n"] == 4
            assert set(e["per_type"]) == {t for types in task.QUESTION_TYPES.values() for t in types}
            if e["rule"] != "dense":
                assert 0.0 <= e[split]["kept_in_region"] <= 1.0
                assert e["flops_vs_dense"] < 1.0
    # Training went through upstream's train.py with the plugin's flags (distillation had a teacher).
    assert "align_loss_first" in rep["phases"]["distill_sparsevlm"]
    assert "--token_selection sparsevlm_v2" in rep["phases"]["distill_sparsevlm_v2"]["command"]
    assert "align_loss_first" not in rep["phases"]["control"]
    assert {"eval_distill_sparsevlm", "eval_distill_sparsevlm_v2", "eval_control"} <= set(rep["phases"])
    # The attention probe of an untrained LM: no preference for the asked objects (lift ~ 1).
    lift = rep["phases"]["probe"]["attention_lift_per_layer"]
    assert set(lift) == {"object", "location"} and len(lift["object"]) == 16
    assert all(0.8 < v < 1.2 for v in lift["object"] + lift["location"]), lift
    assert set(rep["targets"]) >= {"dense_object_at_least_90", "text_guided_vs_baselines_at_lowest_budget",
                                   "distill_sparsevlm_minus_control"}
    assert rep["targets"]["distill_sparsevlm_minus_control"]["se"] is not None
    for name in ("results.md", "accuracy_vs_tokens.png", "training_logs.txt"):
        assert (out / name).exists(), name
    # A second call on the same --work resumes: every phase is done, the rows are kept.
    again = tmp_path / "again"
    assert study.main(["--preset", "smoke", "--out", str(again), "--work", str(tmp_path / "work")]) == 0
    with open(again / "results.json") as handle:
        resumed = json.load(handle)
    assert resumed["evaluations"] == rep["evaluations"] and resumed["phases"] == rep["phases"]
    assert len(resumed["earlier_calls"]) == 2


def test_read_answer_takes_the_answer_word_a_generation_starts_with():
    assert task.read_answer("greenfirehose") == "green"
    assert task.read_answer(" Triangle.\n\nWhat") == "triangle"
    assert task.read_answer("two") == "two" and task.read_answer("twelve") == ""
    assert task.read_answer("\n") == ""


def test_a_weak_tower_stops_the_study(tmp_path, monkeypatch):
    """Run 2's lesson: a tower that can't tell the shapes apart makes every later phase moot."""
    monkeypatch.setitem(study.PRESETS, "smoke", dataclasses.replace(study.PRESETS["smoke"], tower_min_accuracy=1.01))
    out = tmp_path / "out"
    assert study.main(["--preset", "smoke", "--out", str(out), "--work", str(tmp_path / "work")]) == 1
    with open(out / "results.json") as handle:
        rep = json.load(handle)
    assert "under 1.01" in rep["phases"]["tower"]["error"]
    assert set(rep["phases"]) == {"data", "tower"} and "finetune" in rep["skipped"]


def test_the_nocell_preset_trains_the_tower_without_its_cell_head(tmp_path, monkeypatch):
    assert study.PRESETS["full-nocell"] == dataclasses.replace(study.PRESETS["full"], tower_cell_head=False)
    monkeypatch.setitem(study.PRESETS, "smoke", dataclasses.replace(study.PRESETS["smoke"], tower_cell_head=False))
    out = tmp_path / "out"
    assert study.main(["--preset", "smoke", "--out", str(out), "--until", "tower"]) == 0
    with open(out / "results.json") as handle:
        assert set(json.load(handle)["phases"]["tower"]["held_out_patch_accuracy"]) == {"color", "shape"}
