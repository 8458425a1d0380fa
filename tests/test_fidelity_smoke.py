"""The fidelity study (benchmarks/fidelity/): task generator, baseline scorers, and a CPU
smoke run of the whole pipeline (tiny sizes, a few steps; it learns nothing)."""
import json
import math
import os
import random
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDY = os.path.join(ROOT, "benchmarks", "fidelity")
sys.path.insert(0, STUDY)

import task  # noqa: E402


def test_questions_are_answered_by_their_region():
    rng = random.Random(0)
    for _ in range(200):
        scene = task.random_scene(rng, 336)
        for qtype in task.QUESTION_TYPES:
            question, answer, info = task.make_question(rng, scene, qtype)
            assert len(answer.split()) == 1 and answer in task.answer_vocabulary()
            cells = scene["cells"]
            if qtype in ("color", "shape"):
                assert task.CELL_NAMES[info["cell"]] in question
                assert answer == cells[info["cell"]][qtype]
            elif qtype == "row":
                shape = question.split(" a ")[1].split(" in ")[0]
                row = cells[3 * info["row"]: 3 * info["row"] + 3]
                assert answer == ("yes" if any(c and c["shape"] == shape for c in row) else "no")
            else:
                color = question.split(" a ")[1].split(" shape")[0]
                column = cells[info["column"]::3]
                assert answer == ("yes" if any(c and c["color"] == color for c in column) else "no")


def test_splits_are_upstream_json_and_held_out(tmp_path):
    paths = task.write_splits(str(tmp_path), size=56, n_train=8, n_test_images=4, n_test=16, turns=3,
                              n_distill=8, seed=0)
    train = json.load(open(paths["train"]))
    test = json.load(open(paths["test"]))
    pretrain = json.load(open(paths["pretrain"]))
    assert all(len(r["conversations"]) == 2 for r in pretrain)  # --version plain
    assert all(r["conversations"][0]["value"].startswith("<image>\n") for r in train + test + pretrain)
    assert all(len(r["conversations"]) == 2 for r in test)  # single turn
    assert {r["image"] for r in train}.isdisjoint({r["image"] for r in test})
    assert {r["info"]["type"] for r in test} == set(task.QUESTION_TYPES)
    assert all(os.path.exists(os.path.join(paths["image_folder"], r["image"])) for r in train + test)
    assert task.exact_match(" Yes.", "yes") and not task.exact_match("yes yes", "yes")


def test_caption_turn_ends_each_training_conversation(tmp_path):
    paths = task.write_splits(str(tmp_path), size=56, n_train=6, n_test_images=4, n_test=8, turns=3,
                              seed=0, caption_turn=True)
    pretrain = {r["image"]: r["conversations"][1]["value"] for r in json.load(open(paths["pretrain"]))}
    for record in json.load(open(paths["train"])):
        turns = record["conversations"]
        assert len(turns) == 2 * 4
        assert turns[-2]["value"] == "Describe the grid." and turns[-1]["value"] == pretrain[record["image"]]
        assert all(t["value"] != "Describe the grid." for t in turns[:-2])
    assert all(len(r["conversations"]) == 2 for r in json.load(open(paths["test"])))


def test_shuffled_captions_name_every_cell_once_and_leave_the_questions_alone(tmp_path):
    kwargs = dict(size=56, n_train=40, n_test_images=4, n_test=8, n_distill=8, turns=3, seed=0, caption_turn=True)
    plain = task.write_splits(str(tmp_path / "plain"), **kwargs)
    mixed = task.write_splits(str(tmp_path / "mixed"), shuffled_captions=0.5, **kwargs)
    pretrain = {r["image"]: r["conversations"][1]["value"] for r in json.load(open(mixed["pretrain"]))}
    shuffled = 0
    for before, after in zip(json.load(open(plain["train"])), json.load(open(mixed["train"]))):
        assert before["conversations"][:-2] == after["conversations"][:-2]  # same questions
        prompt, text = after["conversations"][-2]["value"], after["conversations"][-1]["value"]
        if prompt == task.DESCRIBE:
            assert text == pretrain[after["image"]]
            continue
        assert prompt == task.DESCRIBE_ANY_ORDER and text != pretrain[after["image"]]
        items = text.rstrip(".").split(", ")
        assert sorted(items) == sorted(pretrain[after["image"]].rstrip(".").split(", "))
        shuffled += 1
    assert 8 <= shuffled <= 32
    for split in ("test", "distill"):
        assert json.load(open(plain[split])) == json.load(open(mixed[split]))
    with pytest.raises(ValueError, match="shuffled_captions=1.5"):
        task.write_splits(str(tmp_path / "bad"), shuffled_captions=1.5, **kwargs)


def test_baseline_rules_switch_and_restore(tiny_llava):
    """Each baseline (a public selection rule) changes which visual tokens stay; afterwards the
    model prunes with SparseVLM again."""
    from llava.mm_utils import process_images

    import sparsevlm_patch
    from run_study import METHODS, scoring

    tokenizer, model, processor = tiny_llava
    scene = task.random_scene(random.Random(3), 336)
    image = process_images([task.draw_scene(scene)], processor, model.config)
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.conversation import conv_templates
    from llava.mm_utils import tokenizer_image_token

    conv = conv_templates["v1"].copy()
    conv.append_message(conv.roles[0], "<image>\nWhat color is the shape in the top-left cell?")
    conv.append_message(conv.roles[1], None)
    ids = tokenizer_image_token(conv.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]
    assert METHODS == ("sparsevlm", "random", "fastv")

    def run():
        with torch.no_grad():
            model(ids, images=image)
        mask = sparsevlm_patch.last_keep_mask(model)
        return None if mask is None else mask.clone()

    sparsevlm_patch.enable(model, retain_tokens=64)
    plain = run()  # SparseVLM, the plugin's default rule

    def keep(method, seed=0):
        with scoring(model, method, 64, seed=seed):
            mask = run()
            kept[method] = sparsevlm_patch.last_stats(model)["kept_visual"]
        assert torch.equal(run(), plain), method  # SparseVLM again afterwards
        return mask

    kept = {}
    masks = {m: keep(m) for m in METHODS}
    assert torch.equal(masks["sparsevlm"], plain)
    assert kept["sparsevlm"] == [[66, 30, 17]]
    assert all(k == kept["sparsevlm"] for k in kept.values()), kept  # same budget for every method
    for a in masks:
        for b in masks:
            if a < b:
                assert not torch.equal(masks[a], masks[b]), (a, b)
    assert torch.equal(keep("random", seed=0), masks["random"])
    assert not torch.equal(keep("random", seed=1), masks["random"])
    assert torch.equal(keep("fastv_last_token"), masks["fastv"])  # the earlier runs' name
    with pytest.raises(ValueError, match="visual_only"):
        with scoring(model, "visual_only", 64):
            pass
    with scoring(model, "dense"):
        mask = run()
    assert mask is None or bool(mask.all())  # disabled: every token stays


def test_study_smoke_end_to_end(tmp_path):
    out = tmp_path / "fidelity"
    proc = subprocess.run([sys.executable, os.path.join(STUDY, "run_study.py"), "--preset", "smoke",
                           "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    for name in ("results.json", "results.md", "accuracy_vs_tokens.png", "study.log"):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "results.json").read_text())
    assert "error" not in report
    results = report["results"]
    assert set(results) == {"dense", "sparsevlm", "random", "fastv", "sparsevlm_distilled", "dense_control"}
    for single in ("dense", "dense_control"):
        assert 0.0 <= results[single]["accuracy"] <= 1.0 and results[single]["flops_vs_dense"] == 1.0
    for method, per_budget in results.items():
        if method in ("dense", "dense_control"):
            continue
        assert set(per_budget) == {"192", "128", "96", "64"}, method
        for budget, entry in per_budget.items():
            assert 0.0 <= entry["accuracy"] <= 1.0 and entry["n"] == report["data"]["test_questions"]
            assert 0.0 < entry["flops_vs_dense"] < 1.0, (method, budget)
    # Same per-layer budgets for every selection rule at a given retain value.
    for budget in ("192", "64"):
        kept = {m: results[m][budget]["kept_visual_per_layer"] for m in results if not m.startswith("dense")}
        assert len({tuple(v) for v in kept.values()}) == 1, kept
    training = report["training"]
    for stage in ("pretrain", "finetune", "distill-192", "distill-128", "distill-96", "distill-64", "distill-control"):
        assert stage in training and math.isfinite(training[stage]["loss_last"]), stage
        assert stage in report["commands"]
    assert "--tune_mm_mlp_adapter True" in report["commands"]["pretrain"]
    assert "--sparse False --align_loss_weight 0" in report["commands"]["finetune"]
    assert "--retain_tokens 64" in report["commands"]["distill-64"]
    assert training["distill-64"]["align_loss_last"] > 0
    # the control: the same extra steps, dense, without a teacher
    assert "--sparse False" in report["commands"]["distill-control"]
    assert "--retain_tokens" not in report["commands"]["distill-control"]
    assert "align_loss_last" not in training["distill-control"]
    assert report["summary"]["dense_control_accuracy"] == results["dense_control"]["accuracy"]
    md = (out / "results.md").read_text()
    assert "retain 64" in md and "prefill FLOPs" in md and "(control)" in md


def test_study_split_over_calls(tmp_path):
    """stop_after=dense exports the dense model in pieces; dense_from picks it up (a middle
    call fine-tunes it further and exports it again), skips the training and reports the
    earlier calls' training records."""
    first, middle, second = tmp_path / "first", tmp_path / "middle", tmp_path / "second"
    work = tmp_path / "work"
    run = [sys.executable, os.path.join(STUDY, "run_study.py"), "--preset", "smoke", "--work", str(work)]
    proc = subprocess.run(run + ["--out", str(first), "--set", "stop_after=dense"],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    parts = sorted(p.name for p in first.iterdir() if p.name.startswith("dense.tar.part"))
    assert parts and all((first / p).stat().st_size > 0 for p in parts)
    report_a = json.loads((first / "results.json").read_text())
    assert set(report_a["results"]) == {"dense"} and "finetune" in report_a["training"]

    import shutil
    shutil.rmtree(work)  # every call starts on a fresh machine
    proc = subprocess.run(run + ["--out", str(middle), "--set", f"dense_from={first}", "continue_finetune=true",
                                 "stop_after=dense"], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    report_m = json.loads((middle / "results.json").read_text())
    assert "error" not in report_m and report_m["training"]["finetune-continued"]["steps"] > 0
    assert any(p.name.startswith("dense.tar.part") for p in middle.iterdir())

    shutil.rmtree(work)
    proc = subprocess.run(run + ["--out", str(second), "--set", f"dense_from={middle}"],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    report_b = json.loads((second / "results.json").read_text())
    assert "error" not in report_b
    assert "pretrain" not in report_b["training"] and "finetune" not in report_b["training"]
    earlier = report_b["dense_training"]
    assert earlier["training"]["finetune-continued"] == report_m["training"]["finetune-continued"]
    assert earlier["dense_training"]["training"]["finetune"]["steps"] == report_a["training"]["finetune"]["steps"]
    assert report_b["results"]["dense"]["accuracy"] == report_m["results"]["dense"]["accuracy"]
    assert set(report_b["results"]["sparsevlm_distilled"]) == {"192", "128", "96", "64"}
    assert "| finetune |" in (second / "results.md").read_text()


def test_in_region_maps_patches_to_cells_rows_and_columns():
    n = 24 * 24  # 336 px at patch 14
    assert task.in_region(0, n, {"cell": 0}) and task.in_region(n - 1, n, {"cell": 8})
    assert task.in_region(8 * 24 + 0, n, {"cell": 3}) and not task.in_region(7 * 24 + 0, n, {"cell": 3})
    assert task.in_region(23 * 24 + 5, n, {"row": 2}) and not task.in_region(23 * 24 + 5, n, {"row": 1})
    assert task.in_region(3 * 24 + 16, n, {"column": 2}) and not task.in_region(3 * 24 + 15, n, {"column": 2})
    cells = [sum(task.in_region(p, n, {"cell": c}) for p in range(n)) for c in range(9)]
    assert cells == [64] * 9


def test_diagnosis_of_an_exported_model(tmp_path):
    """diagnose.py on a smoke model: the reading and pruning probes report every place, order
    and method; the share of kept tokens in the question's region does not depend on how the
    questions are batched."""
    import diagnose
    from run_study import METHODS, PRESETS, Evaluator, built_config

    exported, work = tmp_path / "exported", tmp_path / "work"
    proc = subprocess.run([sys.executable, os.path.join(STUDY, "run_study.py"), "--preset", "smoke", "--work",
                           str(work), "--out", str(exported), "--set", "stop_after=dense"],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    out = tmp_path / "diagnosis.json"
    assert diagnose.main(["--dense_from", str(exported), "--work", str(tmp_path / "diag"), "--out", str(out),
                          "--images", "2", "--questions", "8", "--retain", "64", "--cell_images", "3",
                          "--attention_images", "2"]) == 0
    report = json.loads(out.read_text())
    reading = report["reading"]
    assert len(reading["answer_top1_per_turn"]) == 3  # the smoke preset's turns
    assert set(reading["caption_content_top1"]) == {f"{o}, {p}" for o in ("reading", "reversed", "shuffled")
                                                    for p in ("last", "first")}
    assert all(n >= 2 * 9 for n in reading["caption_content_tokens"].values())  # a color or empty word per cell
    methods = report["pruning"]["methods"]
    assert set(methods) == {"dense", *METHODS} and "kept_in_region" not in methods["dense"]
    for method in METHODS:
        assert all(0.0 <= v <= 1.0 for v in methods[method]["kept_in_region"].values())
        assert sum(n for _, n in methods[method]["top_answers"]["color"]) >= 1
    cells = report["cells"]
    assert sum(cells["questions_per_cell"].values()) == cells["questions"] >= 3  # every scene has a shape
    assert set(cells["per_cell"]) <= set(task.CELL_NAMES) and all(0 <= v <= 1 for v in cells["per_cell"].values())
    wrong = round(cells["questions"] * (1 - cells["accuracy"]))
    assert sum(cells["wrong_answers"].values()) == wrong
    blind = cells["wrong_answer_shares_if_blind"]
    assert not blind or abs(sum(blind.values()) - 1) < 1e-3

    assert list(report) == ["command", "model", "reading", "pruning", "cells", "attention"]
    looked = report["attention"]
    assert looked["questions"] >= 2 and 0 < looked["chance"] < 1 and looked["question_tokens_per_prompt"] > 5
    for key in ("answer_token", "question_tokens"):
        mean, best = looked[key]["mean_head"], looked[key]["best_head"]
        assert len(mean) == len(best) == PRESETS["smoke"].layers
        assert all(0 <= m <= b <= 1 for m, b in zip(mean, best))
    best_token = looked["question_best_token"]
    assert 1 <= best_token["questions"] <= looked["questions"]
    for key in ("asked_cell", "another_occupied_cell"):
        assert len(best_token[key]) == PRESETS["smoke"].layers and all(0 <= v <= 1 for v in best_token[key])

    some = tmp_path / "some.json"
    assert diagnose.main(["--dense_from", str(exported), "--work", str(tmp_path / "diag"), "--out", str(some),
                          "--probes", "attention,cells", "--cell_images", "1", "--attention_images", "1"]) == 0
    assert list(json.loads(some.read_text())) == ["command", "model", "cells", "attention"]

    built = built_config(json.loads((exported / "results.json").read_text()))
    cfg, loaded = diagnose.load_dense(str(exported), built, str(tmp_path / "again"), "cpu")
    records = json.loads((work / "data" / "test.json").read_text())
    shares = [Evaluator(replace(cfg, eval_batch=batch), records, str(work / "data" / "images"), print)
              .evaluate(loaded, "sparsevlm", 64)["kept_in_region"] for batch in (1, 5)]
    assert shares[0] == shares[1]


def test_region_shares_count_only_the_attention_paid_to_the_image():
    import torch
    from diagnose import region_shares

    attn = torch.zeros(2, 6, 6)  # 2 heads; tokens 1-4 are visual, 2 and 3 inside the region
    attn[0, 5] = torch.tensor([0.5, 0.1, 0.2, 0.2, 0.0, 0.0])  # 0.4 of the image's 0.5 inside
    attn[1, 5] = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.25, 0.75])  # 0.25 on the image, none inside
    attn[0, 4] = torch.tensor([0.2, 0.0, 0.4, 0.0, 0.4, 0.0])
    attn[1, 4] = torch.tensor([0.0, 0.5, 0.0, 0.0, 0.5, 0.0])
    inside = torch.tensor([False, True, True, False])
    assert torch.allclose(region_shares(attn, torch.tensor([5]), 1, inside), torch.tensor([[0.8], [0.0]]))
    assert torch.allclose(region_shares(attn, torch.tensor([4, 5]), 1, inside),
                          torch.tensor([[0.5, 0.8], [0.0, 0.0]]))


def test_a_wrong_color_is_traced_to_the_cell_it_belongs_to():
    from diagnose import blind_wrong_answer_sources, wrong_answer_source

    def shape(color):
        return {"color": color, "shape": "circle"}

    # top-left red, top-center blue, center green, bottom-right blue; the rest empty
    scene = {"cells": [shape("red"), shape("blue"), None, None, shape("green"), None, None, None, shape("blue")]}
    assert wrong_answer_source(scene, 0, "Blue.") == "neighbour_cell"  # top-center is beside top-left
    assert wrong_answer_source(scene, 0, "green") == "other_cell"  # the center is diagonal to it
    assert wrong_answer_source(scene, 4, "yellow") == "no_cell"
    assert wrong_answer_source(scene, 4, "bottom-right empty") == "not_a_color"
    assert wrong_answer_source(scene, 1, "blue") == "other_cell"  # its own color does not count
    # blind to place, a wrong answer about top-left is blue, green or blue (the other cells' colors)
    assert blind_wrong_answer_sources([(scene, 0)]) == {"neighbour_cell": round(2 / 3, 4), "other_cell": round(1 / 3, 4)}
    assert blind_wrong_answer_sources([]) == {}


def test_diagnosis_refuses_a_seed_that_draws_training_scenes(tmp_path, capsys):
    import diagnose

    (tmp_path / "results.json").write_text(json.dumps({"config": {"seed": 5}}))
    with pytest.raises(SystemExit):
        diagnose.main(["--dense_from", str(tmp_path), "--work", str(tmp_path / "w"), "--out", str(tmp_path / "d.json"),
                       "--seed", "4"])
    assert "--seed 4: the cells and attention probes would draw the exporting run's training scenes" in \
        capsys.readouterr().err
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("probes", ["attention,colour", ""])
def test_diagnosis_names_an_unknown_probe(tmp_path, capsys, probes):
    import diagnose

    with pytest.raises(SystemExit):
        diagnose.main(["--dense_from", str(tmp_path), "--work", str(tmp_path / "w"), "--out", str(tmp_path / "d.json"),
                       "--probes", probes])
    assert f"--probes {probes!r}: expected one or more of reading,pruning,cells,attention" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_dense_from_without_parts_names_the_setting(tmp_path):
    from run_study import PRESETS, import_dense

    with pytest.raises(FileNotFoundError, match="dense_from="):
        import_dense(str(tmp_path), str(tmp_path / "dense"), {}, print, PRESETS["smoke"])


def test_dense_from_built_with_other_settings_is_refused(tmp_path):
    """Runs 1-2 exported models built on CLIP's random position init (scale 10); the CLIP is
    rebuilt from the settings, so importing one into a run of other settings must fail."""
    from run_study import PRESETS, import_dense

    (tmp_path / "dense.tar.part00").write_bytes(b"")
    (tmp_path / "results.json").write_text(json.dumps({"config": {"clip_pos_scale": 10.0, "hidden": 32}}))
    with pytest.raises(ValueError, match="clip_position.*random.*sincos") as error:
        import_dense(str(tmp_path), str(tmp_path / "dense"), {}, print, PRESETS["smoke"])
    assert "clip_pos_scale" in str(error.value) and "hidden" not in str(error.value)
    assert not (tmp_path / "dense").exists()


def test_dense_from_needs_the_exporting_calls_report(tmp_path):
    from run_study import PRESETS, import_dense

    (tmp_path / "dense.tar.part00").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="holds no results.json"):
        import_dense(str(tmp_path), str(tmp_path / "dense"), {}, print, PRESETS["smoke"])


def test_set_names_an_unknown_key(tmp_path, capsys):
    from run_study import main

    for item in ("clip_positions=sincos", "__class__=x", "vocab"):
        with pytest.raises(SystemExit):
            main(["--out", str(tmp_path), "--set", item])
        assert f"--set '{item}': expected KEY=VALUE with KEY one of" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_the_tokenizer_corpus_is_unchanged_without_shuffled_captions():
    """Runs before `shuffled_captions` must rebuild with the same tokenizer: the any-order
    captions only add lines, and draw their order from their own stream."""
    plain, extra = task.tokenizer_corpus(), task.tokenizer_corpus(any_order=True)
    assert not any(task.DESCRIBE_ANY_ORDER in line for line in plain)
    assert [line for line in extra if task.DESCRIBE_ANY_ORDER not in line] == plain
    assert len(extra) == len(plain) + 300


def test_sincos_positions_make_the_grid_cell_linear(tmp_path):
    """The study's CLIP: with the 2-D sine-cosine table a linear probe reads each patch's grid
    cell far better than with CLIP's random position init; the colors stay readable."""
    import models

    scenes = task.make_scenes(str(tmp_path / "images"), "p", 12, seed=5, size=336)
    images = [str(tmp_path / "images" / name) for name, _ in scenes]
    probes = {}
    for position, scale in (("random", 10.0), ("sincos", 0.5)):
        clip = models.build_clip(str(tmp_path / position), hidden=64, layers=2, position=position,
                                 pos_scale=scale, seed=0)
        probes[position] = models.locality_probe(clip, images, dtype=torch.float32)
    assert probes["sincos"]["cell_probe_accuracy"] > 0.9
    assert probes["sincos"]["cell_probe_accuracy"] > probes["random"]["cell_probe_accuracy"] + 0.1
    assert probes["sincos"]["color_probe_accuracy"] > probes["sincos"]["color_majority_baseline"] + 0.05
    with pytest.raises(ValueError, match="position='grid'"):
        models.build_clip(str(tmp_path / "bad"), hidden=64, position="grid")


def test_two_arms_returns_both_reports_and_the_better_arms_model(tmp_path):
    """two_arms.sh (two settings at once on nvidia-h200-x2), here with the smoke preset on the CPU:
    one archive with both result folders; only the arm with the higher dense accuracy keeps its
    exported model (the device returns about 60 MB)."""
    import tarfile

    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OUT": str(out), "PRESET": "smoke", "SCRATCH": str(tmp_path), "STAGGER_S": "0",
           "PYTHON": sys.executable}
    script = os.path.join(STUDY, "two_arms.sh")
    for args, message in ((["stop_after=dense", "a", "", "b"], "expected 5 arguments, got 4"),
                          (["stop_after=dense", "a", "", "a", ""], "NAME_A and NAME_B are both 'a'"),
                          (["stop_after=dense", "a/b", "", "c", ""], "arm name 'a/b'")):
        proc = subprocess.run(["bash", script, *args], env=env, cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not list(out.iterdir())
    proc = subprocess.run(["bash", script, "stop_after=dense", "a", "", "b", "rope_theta=1000000"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    archive = tmp_path / "arms.tar"
    with open(archive, "wb") as whole:
        for part in sorted(out.iterdir()):
            assert part.name.startswith("arms.tar.part") and part.stat().st_size <= 15 * 2 ** 20
            whole.write(part.read_bytes())
    back = tmp_path / "back"
    with tarfile.open(archive) as tar:
        tar.extractall(back)
    reports = {arm: json.loads((back / arm / "results.json").read_text()) for arm in "ab"}
    assert reports["a"]["config"]["rope_theta"] == 10000.0 and reports["b"]["config"]["rope_theta"] == 1e6
    with_model = [arm for arm in "ab" if any(p.name.startswith("dense.tar.part") for p in (back / arm).iterdir())]
    assert with_model == [max("ab", key=lambda arm: reports[arm]["results"]["dense"]["accuracy"])]


def test_keep_best_export_keeps_the_best_exported_model_only(tmp_path):
    from run_study import keep_best_export

    def arm(name, accuracy=None, parts=2):
        folder = tmp_path / name
        folder.mkdir()
        if accuracy is not None:
            (folder / "results.json").write_text(json.dumps({"results": {"dense": {"accuracy": accuracy}}}))
        for index in range(parts):
            (folder / f"dense.tar.part{index:02d}").write_bytes(b"x")
        return folder

    def exported(name):
        return sorted(p.name for p in (tmp_path / name).iterdir() if p.name.startswith("dense.tar.part"))

    arm("low", 0.4), arm("high", 0.5), arm("broken"), arm("unexported", 0.9, parts=0)
    assert keep_best_export(str(tmp_path), ["low", "high", "broken", "unexported", "missing"]) == "high"
    assert exported("high") == ["dense.tar.part00", "dense.tar.part01"]
    assert exported("low") == exported("broken") == [] and (tmp_path / "low" / "results.json").exists()
    arm("tie_a", 0.5), arm("tie_b", 0.5)
    assert keep_best_export(str(tmp_path), ["tie_a", "tie_b"]) == "tie_a" and exported("tie_b") == []
    assert keep_best_export(str(tmp_path), ["unexported", "missing"]) is None


def test_llm_and_tokenizer_settings_reach_the_built_model(tmp_path):
    import models

    corpus = task.tokenizer_corpus(n_scenes=40)
    plain = models.build_tokenizer(str(tmp_path / "plain"), corpus, vocab_size=400)
    whole = models.build_tokenizer(str(tmp_path / "whole"), corpus, vocab_size=400, whole_words=task.CELL_NAMES)
    question = "What color is the shape in the top-left cell?"
    assert "▁top-left" not in plain.tokenize(question)
    assert "▁top-left" in whole.tokenize(question)
    for name in task.CELL_NAMES:
        assert whole.tokenize(f"the {name} cell") == ["▁the", f"▁{name}", "▁cell"]
    folder = models.build_llm(str(tmp_path / "llm"), whole, hidden=32, layers=2, heads=2, intermediate=64,
                              rope_theta=1e6)
    assert json.loads((tmp_path / "llm" / "config.json").read_text())["rope_theta"] == 1e6 and folder


def test_row_column_weight_shifts_the_training_mix_only(tmp_path):
    from run_study import PRESETS, training_mix

    smoke = PRESETS["smoke"]
    assert training_mix(smoke) is None
    assert training_mix(replace(smoke, row_column_weight=3.0)) == {"color": 1.0, "shape": 1.0, "row": 3.0,
                                                                    "column": 3.0}
    with pytest.raises(ValueError, match="row_column_weight=0.0: expected a weight > 0"):
        training_mix(replace(smoke, row_column_weight=0.0))

    def row_column_share(mix, folder):
        paths = task.write_splits(str(tmp_path / folder), size=56, n_train=60, n_test_images=4, n_test=16,
                                  n_distill=12, turns=8, seed=3, train_mix=mix)
        questions = [turn["value"] for record in json.loads(open(paths["train"]).read())
                     for turn in record["conversations"] if turn["from"] == "human"]
        others = [json.loads(open(paths[split]).read()) for split in ("test", "distill")]
        return sum(q.startswith("<image>\nIs there") or q.startswith("Is there") for q in questions) / len(questions), others

    even, even_others = row_column_share(None, "even")
    heavy, heavy_others = row_column_share(training_mix(replace(smoke, row_column_weight=3.0)), "heavy")
    assert heavy > even + 0.15
    assert heavy_others == even_others  # the same test and distill questions, whatever the mix


def test_dense_from_refuses_a_model_of_another_rope_base_or_tokenizer(tmp_path):
    """Runs 1-4 built their LLM with RoPE base 10^4 and split cell names into pieces."""
    from run_study import PRESETS, import_dense

    (tmp_path / "dense.tar.part00").write_bytes(b"")
    (tmp_path / "results.json").write_text(json.dumps({"config": {"clip_position": "sincos", "clip_pos_scale": 1.0}}))
    wanted = replace(PRESETS["smoke"], clip_pos_scale=1.0, rope_theta=1e6, cell_name_tokens=True)
    with pytest.raises(ValueError) as error:
        import_dense(str(tmp_path), str(tmp_path / "dense"), {}, print, wanted)
    assert "'rope_theta': (10000.0, 1000000.0)" in str(error.value)
    assert "'cell_name_tokens': (False, True)" in str(error.value)


def test_continued_fine_tuning_is_budgeted_with_the_fine_tuning_step_time():
    from run_study import fine_tuning_step_seconds

    training = {"pretrain": {"step_seconds": 0.2}, "finetune": {"step_seconds": 0.27}}
    assert fine_tuning_step_seconds(training) == 0.27
    assert fine_tuning_step_seconds({**training, "finetune-continued": {"step_seconds": 0.28}}) == 0.28
    assert fine_tuning_step_seconds({"pretrain": {"step_seconds": 0.2}}) is None


def test_the_fine_tuning_budget_takes_a_given_step_time(tmp_path, capsys):
    from run_study import main

    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, os.path.join(STUDY, "run_study.py"), "--preset", "smoke", "--out", str(out),
                           "--work", str(tmp_path / "work"), "--set", "time_budget=300", "finetune_step_seconds=0.5",
                           "stop_after=dense"], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "for fine-tuning at ~0.500s/step" in (out / "study.log").read_text()
    for item, message in (("finetune_step_seconds=-1", "--set finetune_step_seconds=-1.0: expected a finite number >= 0"),
                          ("finetune_step_seconds=nan", "--set finetune_step_seconds=nan: expected a finite number"),
                          ("rope_theta=0", "--set rope_theta=0.0: expected a finite number > 0"),
                          ("row_column_weight=inf", "--set row_column_weight=inf: expected a finite number > 0"),
                          ("cell_name_tokens=ture", "--set 'cell_name_tokens=ture': expected cell_name_tokens= one of"),
                          ("heads=four", "--set 'heads=four': expected heads= a int")):
        with pytest.raises(SystemExit):
            main(["--out", str(tmp_path / "bad"), "--set", item])
        assert message in capsys.readouterr().err, item
    assert not (tmp_path / "bad").exists()
