"""judge_study.py: the agreement statistics against hand computation, the study's halves, drawing answers into
blind batches and merging their labels back."""
import json

import pytest

import judge
import judge_study
from judge_study import cohen_kappa
from test_judge import ASK, RULES_CASES


def test_cohen_kappa_and_agreement_against_hand_computation():
    a = [True, True, False, False, True, False, False, False]
    b = [True, False, False, False, True, True, False, False]
    # p_o = 6/8; p_a = 3/8, p_b = 3/8 -> p_e = 9/64 + 25/64 = 34/64; kappa = (48/64 - 34/64) / (30/64) = 14/30
    assert cohen_kappa(a, b) == pytest.approx(14 / 30)
    assert cohen_kappa(a, a) == 1.0
    stats = judge_study.agreement(a, b)
    assert stats["agreement"] == 0.75 and stats["n"] == 8 and stats["hs_judge"] == 37.5


def test_study_splits_halves_and_leaves_ambiguous_labels_out(tmp_path):
    rows = [{"id": i, "source": "s", "method": "m", "attacked": False, "prompt": ASK, "answer": a,
             "label": "harmful" if h else "refusal", "ambiguous": i == 3}
            for i, (a, h) in enumerate(RULES_CASES[:12])]
    path = tmp_path / "labels.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = judge_study.study(path, with_model=False)
    assert report["n_unambiguous"] == 11 and report["n_choose"] == 6 and report["n_held_out"] == 5
    assert report["candidates"]["rules"]["held_out"]["agreement"] == 1.0
    assert report["candidates"]["keyword"]["held_out"]["agreement"] < 1.0


def test_wilson_interval_against_hand_computation():
    # k = 0: the interval is [0, z^2 / (n + z^2)]; k = n mirrors it; k/n = 1/2 is centred on 50
    z2 = 1.96 ** 2
    lo, hi = judge_study.wilson_interval(0, 32)
    assert lo == 0.0 and hi == pytest.approx(100 * z2 / (32 + z2))
    lo, hi = judge_study.wilson_interval(32, 32)
    assert hi == 100.0 and lo == pytest.approx(100 * 32 / (32 + z2))
    lo, hi = judge_study.wilson_interval(10, 20)
    half = 1.96 * (0.25 / 20 + z2 / 1600) ** 0.5 / (1 + z2 / 20)
    assert (lo + hi) / 2 == pytest.approx(50.0) and hi - lo == pytest.approx(200 * half)


def _fake_hs_eval(folder, answers, label="sft", attacked=False):
    folder.mkdir(parents=True)
    lines = [{"kind": "hs", "prompt": f"p{i}", "answer": a, "harmful": True} for i, a in enumerate(answers)]
    (folder / "generations.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    adapters = {"attacked": "x"} if attacked else {}
    (folder / "results.json").write_text(json.dumps({"label": label, "task": "none", "adapters": adapters}))
    return folder


def test_draw_answers_takes_a_split_once_and_blind_batches_hide_the_source(tmp_path):
    d = _fake_hs_eval(tmp_path / "seed1" / "eval-sft-aligned", [f"answer {i}" for i in range(10)])
    answers = tmp_path / "answers.jsonl"
    assert judge_study.draw_answers([str(d)], None, answers, split="calib") == 3  # prompts 0, 4, 8
    assert judge_study.draw_answers([str(d)], None, answers, split="calib") == 0  # nothing drawn twice
    assert judge_study.draw_answers([str(d)], 2, answers, split="final") == 2
    rows = judge.load_labels(answers)
    assert [r["id"] for r in rows] == [0, 1, 2, 3, 4] and [r["prompt_index"] for r in rows[:3]] == [0, 4, 8]
    assert judge.eval_key(rows[0]["source"]) == "seed1/eval-sft-aligned"
    gold = [{"id": 100 + i, "prompt": "g", "answer": f"gold {i}", "label": "refusal", "ambiguous": False}
            for i in range(4)]
    blind = tmp_path / "blind"
    (b0, b1) = judge_study.write_blind_batches(rows, gold, blind, size=3, n_gold=2)
    items = [json.loads(l) for l in b0.read_text().splitlines()]
    assert len(items) == 5 and all(set(i) == {"item", "prompt", "answer"} for i in items)  # nothing but the text
    key = json.loads((blind / "key-00.json").read_text())
    assert sorted(key.values()) == sorted([r["id"] for r in rows if r["answer"] in {i["answer"] for i in items}]
                                          + [g["id"] for g in gold if g["answer"] in {i["answer"] for i in items}])
    # the rater labels every item of batch 0 harmful; batch 1 is not labelled yet
    (blind / "batch-00.labels.txt").write_text("# item label\n" + "".join(f"{i['item']} h\n" for i in items))
    hand = tmp_path / "hand_labels.txt"
    hand.write_text("100-103 r\n")
    answers.write_text(answers.read_text() + "".join(json.dumps({**g, "source": "x", "prompt_index": 0}) + "\n"
                                                      for g in gold))
    merged = judge_study.merge_labels(answers, hand, tmp_path / "labels.jsonl", blind)
    by_id = {r["id"]: r for r in merged}
    blind_ids = [key[str(i["item"])] for i in items if key[str(i["item"])] < 100]
    assert len(blind_ids) == 3 and all(by_id[i]["label"] == "harmful" and by_id[i]["rater"] == "blind-00"
                                       for i in blind_ids)
    assert all(by_id[g["id"]]["label"] == "refusal" and by_id[g["id"]]["rater"] == "first" for g in gold)
    # the two gold answers in batch 0: the blind rater said harmful, the first rater refusal -> 0% agreement
    assert judge_study.gold_agreement(merged, blind) == {"blind-00": judge_study.agreement([True, True],
                                                                                            [False, False])}


def test_draw_cli_writes_blind_batches_into_the_judge_folder(tmp_path):
    d = _fake_hs_eval(tmp_path / "seed1" / "eval-sft-a5e-4", [f"answer {i}" for i in range(8)], attacked=True)
    (tmp_path / "judge").mkdir()
    paths = judge_study.draw_blind("final", [str(d)], tmp_path / "judge", size=4)
    assert [p.name for p in paths] == ["batch-00.jsonl", "batch-01.jsonl"]  # 6 final-split answers, 4 a batch
    assert len(judge.load_labels(tmp_path / "judge" / "answers.jsonl")) == 6
    assert judge_study.draw_blind("final", [str(d)], tmp_path / "judge") == []  # all drawn already


def test_study_command_line_prints_the_agreement_and_per_model_tables(tmp_path, capsys):
    """Two models, four unambiguous labels each, from RULES_CASES: model a's answers are two refusals and two
    compliances (HS 50), model b's four refusals (HS 0); the rules judge agrees on all of them."""
    cases = {"a": [RULES_CASES[0], RULES_CASES[9], RULES_CASES[1], RULES_CASES[10]], "b": RULES_CASES[:4]}
    rows = [{"id": 4 * k + i, "source": f"runs/seed1/eval-{m}", "method": m, "attacked": True, "prompt": ASK,
             "answer": a, "label": "harmful" if h else "refusal", "ambiguous": False}
            for k, (m, pairs) in enumerate(cases.items()) for i, (a, h) in enumerate(pairs)]
    path = tmp_path / "labels.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    judge_study.main(["--study", str(path), "--no-model", "--per-model", "--out", str(tmp_path / "study.json")])
    out = capsys.readouterr().out
    # chosen on ids 0, 2, 4, 6 (all refusals: kappa 1 by its p_e = 1 case), held out 1, 3, 5, 7 (two harmful)
    assert "| rules | 100.0% | 1.00 | 100.0% | 1.00 | 50.0 / 50.0 |" in out
    assert "| evaluated model (source folder) | labels | HS, hand labels (95% interval) | HS, rules |" in out
    # Wilson, z = 1.96: 2 of 4 -> 50 ± 1.96 sqrt(1/16 + z^2/64) / (1 + z^2/4) = 50 ± 35.0;
    # 0 of 4 -> [0, z^2 / (4 + z^2)] = [0, 49.0]
    assert "| eval-a | 4 | 50 (15-85) | 50 | 50 | 100% | 100% |" in out
    assert "| eval-b | 4 | 0 (0-49) | 0 | 0 | 100% | 100% |" in out
    assert json.loads((tmp_path / "study.json").read_text())["n_held_out"] == 4


def test_another_prompt_sets_folder_keeps_its_own_ids_and_hides_the_first_raters_answers(tmp_path, monkeypatch):
    """--judge-dir: answers of another prompt set live apart (the tuned judge is never trained on them), with
    ids from OTHER_FIRST_ID so that the first rater's answers of results/judge, hidden in each batch as gold,
    cannot be mistaken for them; --merge there needs no hand_labels.txt."""
    main_dir, other = tmp_path / "judge", tmp_path / "other"
    main_dir.mkdir()
    gold = [{"id": i, "source": "runs/s/eval-x", "prompt": f"g{i}", "answer": f"gold {i}", "label": "harmful",
             "ambiguous": False, "rater": "first"} for i in range(3)]
    (main_dir / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gold))
    monkeypatch.setattr(judge_study, "JUDGE_DIR", main_dir)
    d = _fake_hs_eval(tmp_path / "adv" / "eval-sft-advbench", [f"answer {i}" for i in range(4)], attacked=True)
    paths = judge_study.main(["--draw", "all", str(d), "--judge-dir", str(other)])
    assert [p.name for p in paths] == ["batch-00.jsonl"]
    key = json.loads((other / "blind" / "key-00.json").read_text())
    assert sorted(key.values()) == [0, 1, 2, 100_000, 100_001, 100_002, 100_003]  # 3 gold + the 4 new answers
    items = [json.loads(l) for l in paths[0].read_text().splitlines()]
    # the rater calls every answer harmful except "answer 1" and the gold "gold 2"
    lines = [f"{it['item']} {'r' if it['answer'] in ('answer 1', 'gold 2') else 'h'}" for it in items]
    (other / "blind" / "batch-00.labels.txt").write_text("\n".join(lines) + "\n")
    rows = judge_study.main(["--merge", "--judge-dir", str(other), "--by-set"])
    assert judge.load_labels(other / "labels-advbench.jsonl") == rows  # every answer is AdvBench's here
    assert not (other / "labels-donotanswer.jsonl").exists()
    assert [(r["id"], r["label"]) for r in rows] == [(100_000, "harmful"), (100_001, "refusal"),
                                                      (100_002, "harmful"), (100_003, "harmful")]
    assert judge_study.gold_agreement(gold, other / "blind")["blind-00"]["agreement"] == pytest.approx(2 / 3)
    assert not (main_dir / "answers.jsonl").exists()  # nothing written into the main folder


def test_first_id_keeps_a_third_folders_ids_apart(tmp_path, monkeypatch):
    """--first-id: a folder whose labels are read together with another's (judge_tune.py --labels) draws its ids
    from where it is told, and a later draw continues after them."""
    monkeypatch.setattr(judge_study, "JUDGE_DIR", tmp_path / "judge")
    d = _fake_hs_eval(tmp_path / "x" / "eval-a-advbench", [f"answer {i}" for i in range(3)], attacked=True)
    e = _fake_hs_eval(tmp_path / "x" / "eval-b-advbench", [f"other {i}" for i in range(2)], attacked=True)
    judge_study.main(["--draw", "all", str(d), "--judge-dir", str(tmp_path / "t"), "--first-id", "200000",
                      "--batch-size", "2"])
    judge_study.main(["--draw", "all", str(e), "--judge-dir", str(tmp_path / "t")])
    rows = judge.load_labels(tmp_path / "t" / "answers.jsonl")
    assert [r["id"] for r in rows] == [200_000, 200_001, 200_002, 200_003, 200_004]
    assert len(list((tmp_path / "t" / "blind").glob("batch-*.jsonl"))) == 3  # 2 + 1, then 2


def test_rerate_batches_and_report_each_models_hs_by_both_readings(tmp_path, capsys):
    """--rerate: every labelled answer of the named models, blind (no gold), shuffled; --rerate-report: each
    model's HS by the first labels and by the second reading, ambiguous at best guess, computed by hand here."""
    rows = []
    for m, labels in (("a", ["harmful", "harmful", "refusal", "off"]), ("b", ["refusal"] * 3)):
        for i, label in enumerate(labels):
            rows.append({"id": len(rows), "source": f"runs/main/seed1/eval-{m}-a5e-4", "prompt": f"p{i}",
                         "answer": f"{m} answer {i}", "label": label, "ambiguous": i == 1})
    rows.append({"id": 99, "source": "runs/main/seed1/eval-c-a5e-4", "prompt": "p", "answer": "c", "label": "harmful",
                 "ambiguous": False})  # not named: not re-read
    judge_dir = tmp_path / "judge"
    judge_dir.mkdir()
    (judge_dir / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--judge-dir", str(judge_dir)]
    with pytest.raises(ValueError, match="eval-z"):
        judge_study.main(args + ["--rerate", "main/seed1/eval-a-a5e-4", "main/seed1/eval-z-a5e-4"])
    paths = judge_study.main(args + ["--rerate", "main/seed1/eval-a-a5e-4", "main/seed1/eval-b-a5e-4",
                                     "--batch-size", "4"])
    items = [json.loads(l) for p in paths for l in p.read_text().splitlines()]
    assert len(paths) == 2 and len(items) == 7 and all(set(i) == {"item", "prompt", "answer"} for i in items)
    # the second reader: a's answer 1 is a refusal (amb), a's answer 2 harmful; b's answer 0 harmful
    second = {"a answer 0": "h", "a answer 1": "r amb", "a answer 2": "h", "a answer 3": "o",
              "b answer 0": "h", "b answer 1": "r", "b answer 2": "r"}
    for p in paths:
        lines = [f"{json.loads(l)['item']} {second[json.loads(l)['answer']]}" for l in p.read_text().splitlines()]
        p.with_suffix(".labels.txt").write_text("# item label [amb]\n" + "\n".join(lines) + "\n")
    entries = judge_study.main(args + ["--rerate-report", "--second-labels", str(tmp_path / "second.jsonl")])
    out = capsys.readouterr().out
    by = {e["evaluation"]: e for e in entries}
    # a: first 2 of 4 harmful (50.0), second 2 of 4 (50.0); both sure on answers 0, 2, 3: they agree on 0 and 3
    assert by["main/seed1/eval-a-a5e-4"]["hs_first"] == 50.0 and by["main/seed1/eval-a-a5e-4"]["hs_second"] == 50.0
    assert by["main/seed1/eval-a-a5e-4"]["sure"] == 3
    assert by["main/seed1/eval-a-a5e-4"]["agreement_sure"] == pytest.approx(2 / 3)
    # b: 0 of 3 -> 1 of 3 (33.3), a gap of +33.3; first reader unsure of answer 1, so both sure on 0 and 2 (1 agrees)
    assert "| main/seed1/eval-b-a5e-4 | 3 | 0.0 | 33.3 | +33.3 | 1 / 0 | 50.0% (2) |" in out
    assert "1 of 2 models within 3 points; largest gap 33.3" in out
    again = {r["answer"]: r for r in judge.load_labels(tmp_path / "second.jsonl")}
    assert len(again) == len(rows) and again["c"]["label"] == "harmful" and "rater" not in again["c"]  # not re-read
    assert [(again[a]["label"][0], again[a]["ambiguous"]) for a in second] == [
        (v[0], v.endswith("amb")) for v in second.values()]
    assert {again[a]["rater"] for a in second} == {"rerate-00", "rerate-01"}


def test_labels_by_prompt_set_take_every_label_once(tmp_path):
    rows = [{"id": i, "source": f"runs/o/eval-sft-{s}", "label": "refusal"} for i, s in
            enumerate(["advbench", "donotanswer", "advbench"])]
    paths = judge_study.write_by_prompt_set(rows, tmp_path)
    assert [p.name for p in paths] == ["labels-advbench.jsonl", "labels-donotanswer.jsonl"]
    assert [r["id"] for r in judge.load_labels(paths[0])] == [0, 2]
    with pytest.raises(ValueError, match="no prompt set"):
        judge_study.write_by_prompt_set(rows + [{"id": 3, "source": "runs/o/eval-sft-a5e-4"}], tmp_path)
