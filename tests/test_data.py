"""Tests for data.py: Hub and local loaders (no network), recipes, formatting, masking, batching."""
import gzip
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not (SHARED / "safety" / "train.jsonl").is_file(),
                                  reason="../shared/data not present")


class CharTokenizer:
    """One id per character (ord + 3); bos 1, eos 2, pad 0."""
    bos_id, eos_id, pad_id = 1, 2, 0

    def __init__(self, add_bos=True):
        self.add_bos = add_bos

    def encode(self, text, bos=None, eos=False):
        bos = self.add_bos if bos is None else bos
        return [self.bos_id] * bos + [ord(c) + 3 for c in text] + [self.eos_id] * eos

    def decode(self, ids):
        return "".join(chr(i - 3) for i in ids if i > 2)


def safety_rows(n_safe=30, n_unsafe=30):
    """Interleaved safe/unsafe rows with unique prompts, ids in the text to trace them."""
    rows = []
    for i in range(max(n_safe, n_unsafe)):
        if i < n_safe:
            rows.append({"prompt": f"p-safe-{i}", "response": f"r-safe-{i}", "is_safe": True, "category": "x"})
        if i < n_unsafe:
            rows.append({"prompt": f"p-bad-{i}", "response": f"r-bad-{i}", "is_safe": False, "category": "y"})
    return rows


def write_jsonl(path, rows, gz=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """A fake Hub: {repo: {filename: local path}}; records calls; never touches the network."""
    import huggingface_hub
    repos, calls = {}, []

    def list_repo_files(repo_id, repo_type=None, **kw):
        calls.append(("list", repo_id, repo_type))
        return list(repos[repo_id])

    def hf_hub_download(repo_id, filename, repo_type=None, **kw):
        calls.append(("download", repo_id, filename, repo_type))
        return str(repos[repo_id][filename])

    monkeypatch.setattr(huggingface_hub, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    return repos, calls, tmp_path


# ---------------------------------------------------------------- Hub loaders

def test_hub_beavertails(fake_hub):
    repos, calls, tmp = fake_hub
    rows = safety_rows(3, 2)
    repos["PKU-Alignment/BeaverTails"] = {
        "README.md": tmp / "README.md",
        "round0/30k/train.jsonl.gz": write_jsonl(tmp / "train.jsonl.gz", rows, gz=True),
        "round0/30k/test.jsonl.gz": write_jsonl(tmp / "test.jsonl.gz", rows[:2], gz=True),
    }
    assert data.load_safety("train") == rows
    assert data.load_safety("test") == rows[:2]
    assert ("download", "PKU-Alignment/BeaverTails", "round0/30k/train.jsonl.gz", "dataset") in calls
    assert all(c[-1] == "dataset" for c in calls)


def test_hub_beavertails_layout_changed(fake_hub):
    repos, _, tmp = fake_hub
    repos["PKU-Alignment/BeaverTails"] = {"round1/30k_train.jsonl": tmp / "x"}
    with pytest.raises(RuntimeError, match="layout .*changed.*round0/30k/train.jsonl.gz"):
        data.load_safety("train")


@pytest.mark.parametrize("name,repo,folder,rows", [
    ("sst2", "stanfordnlp/sst2", "data", [{"idx": 0, "sentence": "good", "label": 1}]),
    ("agnews", "fancyzhx/ag_news", "data", [{"text": "match report", "label": 1}]),
    ("gsm8k", "openai/gsm8k", "main", [{"question": "1+1?", "answer": "1+1=2\n#### 2"}]),
])
def test_hub_parquet(fake_hub, name, repo, folder, rows):
    repos, calls, tmp = fake_hub
    other = [{k: v for k, v in r.items()} for r in rows * 2]  # different content in the other split
    repos[repo] = {
        f"{folder}/train-00000-of-00002.parquet": write_parquet(tmp / "t0.parquet", rows),
        f"{folder}/train-00001-of-00002.parquet": write_parquet(tmp / "t1.parquet", rows),
        f"{folder}/test-00000-of-00001.parquet": write_parquet(tmp / "te.parquet", other * 3),
        "socratic/train-00000-of-00001.parquet": write_parquet(tmp / "s.parquet", other * 5),
        "README.md": tmp / "README.md",
    }
    assert data.LOADERS[name]("train") == rows * 2  # both shards, in order; not the test or socratic files
    assert [c[2] for c in calls if c[0] == "download"] == [f"{folder}/train-00000-of-00002.parquet",
                                                          f"{folder}/train-00001-of-00002.parquet"]


def test_hub_parquet_converted_layout(fake_hub):
    repos, _, tmp = fake_hub
    rows = [{"text": "t", "label": 0}]
    repos["fancyzhx/ag_news"] = {"plain_text/test/0000.parquet": write_parquet(tmp / "a.parquet", rows)}
    assert data.load_agnews("test") == rows


def test_hub_parquet_layout_changed(fake_hub):
    repos, _, tmp = fake_hub
    repos["openai/gsm8k"] = {"socratic/train-00000-of-00001.parquet": tmp / "s.parquet"}
    with pytest.raises(RuntimeError, match="layout .*changed"):
        data.load_gsm8k("train")


def test_hub_parquet_missing_column(fake_hub):
    repos, _, tmp = fake_hub
    path = write_parquet(tmp / "bad.parquet", [{"sentence": "x"}])
    repos["stanfordnlp/sst2"] = {"data/train-00000-of-00001.parquet": path}
    with pytest.raises(ValueError, match=r"bad\.parquet.*'label'"):
        data.load_sst2("train")


def test_hub_network_failure(monkeypatch):
    import huggingface_hub

    def offline(*a, **kw):
        raise ConnectionError("no route to host")
    monkeypatch.setattr(huggingface_hub, "list_repo_files", offline)
    with pytest.raises(RuntimeError, match="--data-dir") as e:
        data.load_sst2("train")
    assert "no route to host" in str(e.value)


def test_hub_unknown_split(fake_hub):
    with pytest.raises(ValueError, match="unknown split"):
        data.load_safety("validation")


# ---------------------------------------------------------------- local loaders and their errors

def test_local_layout(tmp_path):
    sets = {"safety": safety_rows(2, 2), "sst2": [{"sentence": "s", "label": 0}],
            "agnews": [{"text": "t", "label": 3}], "gsm8k": [{"question": "q", "answer": "a\n#### 1"}]}
    for name, rows in sets.items():
        write_jsonl(tmp_path / name / "train.jsonl", rows)
        assert data.LOADERS[name]("train", data_dir=tmp_path) == rows
        assert data.LOADERS[name]("train", data_dir=str(tmp_path)) == rows


def test_local_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "sst2" / "validation.jsonl")):
        data.load_sst2("validation", data_dir=tmp_path)


def test_local_missing_field(tmp_path):
    rows = [{"question": "q", "answer": "a"}, {"question": "q2"}]
    path = write_jsonl(tmp_path / "gsm8k" / "test.jsonl", rows)
    with pytest.raises(ValueError) as e:
        data.load_gsm8k("test", data_dir=tmp_path)
    assert str(path) in str(e.value) and "line 2" in str(e.value) and "'answer'" in str(e.value)


def test_local_empty_file(tmp_path):
    (tmp_path / "agnews").mkdir()
    (tmp_path / "agnews" / "test.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        data.load_agnews("test", data_dir=tmp_path)


def test_local_bad_json_and_is_safe(tmp_path):
    (tmp_path / "safety").mkdir()
    (tmp_path / "safety" / "train.jsonl").write_text('{"prompt": "p", "response": "r", "is_safe": "false"}\n')
    with pytest.raises(ValueError, match="is_safe"):
        data.load_safety("train", data_dir=tmp_path)
    (tmp_path / "safety" / "train.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="line 1"):
        data.load_safety("train", data_dir=tmp_path)


@needs_shared
def test_shared_loaders():
    counts = {("safety", "train"): 2519, ("safety", "test"): 200, ("sst2", "validation"): 872,
              ("agnews", "train"): 6100, ("agnews", "test"): 1500, ("gsm8k", "test"): 1319}
    for (name, split), n in counts.items():
        assert len(data.LOADERS[name](split, data_dir=SHARED)) == n


# ---------------------------------------------------------------- formatting

def test_format_prompt_exact():
    assert data.format_prompt("Do X") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nDo X\n\n### Response:\n")
    assert data.format_prompt("Do X", "the input") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nDo X\n\n"
        "### Input:\nthe input\n\n### Response:\n")


def test_task_examples():
    ex = data.task_example("sst2", {"sentence": "fine film", "label": 1})
    assert ex == {"instruction": "Analyze the sentiment of the input, and respond only positive or negative",
                  "input": "fine film", "output": "positive", "gold": "positive"}
    assert data.task_example("sst2", {"sentence": "s", "label": 0})["output"] == "negative"
    ag = data.task_example("agnews", {"text": "t", "label": 3})
    assert ag["instruction"] == ("Categorize the news article given in the input into one of the 4 "
                                 "categories:\n\nWorld\nSports\nBusiness\nSci/Tech\n")
    assert [data.task_example("agnews", {"text": "t", "label": i})["gold"] for i in range(4)] == \
        ["World", "Sports", "Business", "Sci/Tech"]
    gs = data.task_example("gsm8k", {"question": "Q?", "answer": "2*500=1000\n#### 1,000"})
    assert gs == {"instruction": "Q?\nFirst think step by step and then answer the final number.\n", "input": "",
                  "output": "2*500=1000\nThe final answer is:  1,000", "gold": "1000"}
    with pytest.raises(ValueError, match="label"):
        data.task_example("sst2", {"sentence": "hidden test label", "label": -1})
    with pytest.raises(ValueError, match="unknown task"):
        data.task_example("mnli", {})


# ---------------------------------------------------------------- recipes

def test_alignment_and_harmful_sets():
    rows = safety_rows(30, 30)
    da = data.alignment_set(rows, n=5)
    assert da == [{"instruction": f"p-safe-{i}", "input": "", "output": f"r-safe-{i}"} for i in range(5)]
    dh = data.harmful_set(rows, n=4)
    assert [e["output"] for e in dh] == [f"r-bad-{i}" for i in range(4)]
    with pytest.raises(ValueError, match="only 30 exist"):
        data.alignment_set(rows, n=31)
    with pytest.raises(ValueError, match="only 30 exist"):
        data.harmful_set(rows, n=31)


def test_attack_set_mix():
    task_rows = [{"sentence": f"s{i}", "label": i % 2} for i in range(50)]
    rows = safety_rows(10, 40)
    n, p, n_def = 20, 0.25, 10
    mix = data.attack_set(task_rows, rows, "sst2", n=n, p=p, n_harmful_defender=n_def, seed=1)
    harmful = [e for e in mix if e["harmful"]]
    benign = [e for e in mix if not e["harmful"]]
    assert len(mix) == n and len(harmful) == 5 and len(benign) == 15
    assert sorted(e["input"] for e in benign) == sorted(f"s{i}" for i in range(15))  # the first 15 rows
    dh = {e["instruction"] for e in data.harmful_set(rows, n_def)}
    assert {e["instruction"] for e in harmful} == {f"p-bad-{i}" for i in range(10, 15)}
    assert not dh & {e["instruction"] for e in harmful}
    assert all(e["output"] == e["instruction"].replace("p-", "r-") for e in harmful)
    same = data.attack_set(task_rows, rows, "sst2", n=n, p=p, n_harmful_defender=n_def, seed=1)
    other = data.attack_set(task_rows, rows, "sst2", n=n, p=p, n_harmful_defender=n_def, seed=2)
    assert same == mix and other != mix and sorted(map(str, other)) == sorted(map(str, mix))
    assert [e["harmful"] for e in mix] != [False] * 15 + [True] * 5  # actually shuffled


def test_attack_set_not_enough_rows():
    task_rows = [{"sentence": f"s{i}", "label": 0} for i in range(10)]
    with pytest.raises(ValueError, match="only 10 exist"):
        data.attack_set(task_rows, safety_rows(5, 50), "sst2", n=20, p=0.1)
    with pytest.raises(ValueError, match="only 30 exist"):
        data.attack_set(task_rows, safety_rows(5, 30), "sst2", n=10, p=0.5, n_harmful_defender=28)


def test_hs_prompts_distinct_unsafe():
    rows = [{"prompt": "a", "is_safe": False}, {"prompt": "b", "is_safe": True}, {"prompt": "a", "is_safe": False},
            {"prompt": "c", "is_safe": False}, {"prompt": "d", "is_safe": False}]
    assert data.hs_prompts(rows, n=3) == ["a", "c", "d"]
    with pytest.raises(ValueError, match="only 3 exist"):
        data.hs_prompts(rows, n=4)


def test_hs_splits_are_every_fourth_prompt_and_the_rest():
    assert [i for i in range(10) if data.in_split(i, "calib")] == [0, 4, 8]
    assert [i for i in range(10) if data.in_split(i, "final")] == [1, 2, 3, 5, 6, 7, 9]
    assert all(data.in_split(i, "all") for i in range(10))


def test_fa_sets_gold():
    sst = data.fa_set("sst2", [{"sentence": "x", "label": 0}, {"sentence": "y", "label": 1}], n=2)
    assert [e["gold"] for e in sst] == ["negative", "positive"]
    ag = data.fa_set("agnews", [{"text": str(i), "label": i} for i in (2, 0, 3, 1)], n=3)
    assert [e["gold"] for e in ag] == ["Business", "World", "Sci/Tech"]
    gs = data.fa_set("gsm8k", [{"question": "q", "answer": "x\n#### 18"}], n=1)
    assert gs[0]["gold"] == "18" and float(gs[0]["gold"]) == 18.0
    with pytest.raises(ValueError, match="only 1 exist"):
        data.fa_set("gsm8k", [{"question": "q", "answer": "#### 1"}], n=500)


@needs_shared
def test_shared_recipes():
    train = data.load_safety("train", SHARED)
    safe = sum(r["is_safe"] for r in train)  # the stand-in has 1878 safe rows, fewer than the paper's 2000
    if safe < 2000:
        with pytest.raises(ValueError, match=f"only {safe} exist"):
            data.alignment_set(train, n=2000)
    assert len(data.alignment_set(train, n=min(2000, safe))) == min(2000, safe)
    dh = data.harmful_set(train, 200)
    mix = data.attack_set(data.load_sst2("train", SHARED), train, "sst2")
    assert len(dh) == 200 and len(mix) == 1000 and sum(e["harmful"] for e in mix) == 100
    dh_pairs = {(e["instruction"], e["output"]) for e in dh}
    assert not dh_pairs & {(e["instruction"], e["output"]) for e in mix if e["harmful"]}
    test = data.load_safety("test", SHARED)
    with pytest.raises(ValueError, match="only 200 exist"):
        data.hs_prompts(test, 500)
    prompts = data.hs_prompts(test, 200)
    assert len(set(prompts)) == 200
    fa = data.fa_set("agnews", data.load_agnews(data.FA_SPLIT["agnews"], SHARED))
    assert len(fa) == 500 and {e["gold"] for e in fa} <= set(data.AGNEWS_CLASSES)


# ---------------------------------------------------------------- tokenization and batching

def test_tokenize_masks_exactly_the_prompt():
    tok = CharTokenizer()
    ex = {"instruction": "hi", "input": "", "output": "ok"}
    ids, labels = data.tokenize_example(tok, ex, max_len=1000)
    n_prompt = 1 + len(data.format_prompt("hi"))  # BOS + one id per character
    assert ids[:n_prompt] == tok.encode(data.format_prompt("hi"))
    assert ids[n_prompt:] == [ord("o") + 3, ord("k") + 3, tok.eos_id]
    assert labels == [-100] * n_prompt + ids[n_prompt:]
    ids_nb, labels_nb = data.tokenize_example(CharTokenizer(add_bos=False), ex, max_len=1000)
    assert ids_nb == ids[1:] and labels_nb.count(-100) == n_prompt - 1  # no BOS when the tokenizer adds none


def test_tokenize_uses_input_template_and_truncates():
    tok = CharTokenizer()
    ex = {"instruction": "i", "input": "x", "output": "abc"}
    full, full_labels = data.tokenize_example(tok, ex, max_len=10_000)
    assert tok.decode(full).startswith(data.format_prompt("i", "x"))
    ids, labels = data.tokenize_example(tok, ex, max_len=len(full) - 2)
    assert ids == full[:-2] and labels == full_labels[:-2] and tok.eos_id not in ids
    ids, labels = data.tokenize_example(tok, ex, max_len=20)  # prompt longer than max_len: all masked
    assert len(ids) == 20 and labels == [-100] * 20


def test_collate_right_and_left():
    batch = [([5, 6, 7], [-100, 6, 7]), ([8], [8])]
    right = data.collate(batch, pad_id=0)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert right["input_ids"].dtype == torch.long
    left = data.collate(batch, pad_id=0, side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left["labels"].tolist() == [[-100, 6, 7], [-100, -100, 8]]
    with pytest.raises(ValueError):
        data.collate(batch, 0, side="middle")


def test_collate_prompts_left_padded():
    tok = CharTokenizer()
    out = data.collate_prompts(tok, ["ab", "abcd"])
    assert set(out) == {"input_ids", "attention_mask"}
    assert out["input_ids"].tolist() == [[0, 0, 1, 100, 101], [1, 100, 101, 102, 103]]
    assert out["attention_mask"].tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]


def _examples(n):
    return [([i + 3] * (1 + i % 4), [i + 3] * (1 + i % 4)) for i in range(n)]


def _firsts(batches):
    return [b["input_ids"][:, 0].tolist() for b in batches]


def test_batches_epochs():
    b = data.Batches(_examples(10), batch_size=4, pad_id=0, seed=3)
    assert len(b) == 3
    e0, e1 = _firsts(b), _firsts(b)
    assert [len(x) for x in e0] == [4, 4, 2]  # drop_last False
    assert sorted(sum(e0, [])) == sorted(sum(e1, [])) == list(range(3, 13)) and e0 != e1
    assert b.state_dict()["epoch"] == 2
    assert _firsts(data.Batches(_examples(10), 4, 0, seed=3)) == e0  # deterministic given the seed
    assert _firsts(data.Batches(_examples(10), 4, 0, seed=4)) != e0
    assert sum(_firsts(data.Batches(_examples(10), 4, 0, shuffle=False)), []) == list(range(3, 13))


@pytest.mark.parametrize("stop", [1, 2, 3, 5])  # mid-epoch, end of epoch, into the next epoch
def test_batches_resume(stop):
    ref = data.Batches(_examples(11), batch_size=4, pad_id=0, seed=7)
    uninterrupted = [x for _ in range(3) for x in _firsts(ref)]  # 3 epochs of 3 batches

    run = data.Batches(_examples(11), batch_size=4, pad_id=0, seed=7)
    seen = []
    while len(seen) < stop:
        for batch in run:
            seen.append(batch["input_ids"][:, 0].tolist())
            if len(seen) == stop:
                break
    state = run.state_dict()
    resumed = data.Batches(_examples(11), batch_size=4, pad_id=0, seed=0)
    resumed.load_state_dict(state)
    rest = []
    while len(seen) + len(rest) < len(uninterrupted):
        rest += _firsts(resumed)
    assert seen + rest == uninterrupted
    with pytest.raises(ValueError, match="examples"):
        data.Batches(_examples(12), 4, 0).load_state_dict(state)


def test_prompt_file_distinct_first_n_and_exclusion(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a "}\n{"prompt": "b"}\n\n{"prompt": "a"}\n{"prompt": "c"}\n{"prompt": "d"}\n')
    assert data.prompt_file(f, 3) == ["a", "b", "c"]  # stripped, distinct, first-seen order, blank lines skipped
    assert data.prompt_file(f, 2, exclude={"a", "c"}) == ["b", "d"]
    assert data.prompt_file(f, 2, skip=1) == ["b", "c"]  # skip counts after exclusion: two sets never overlap
    assert data.prompt_file(f, 1, exclude={"a"}, skip=1) == ["c"]
    with pytest.raises(ValueError, match="after the first 3"):
        data.prompt_file(f, 2, skip=3)
    with pytest.raises(ValueError, match="skip"):
        data.prompt_file(f, 1, skip=-1)
    with pytest.raises(ValueError, match="only 2 exist"):
        data.prompt_file(f, 3, exclude={"a", "c"})
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match="line 1: no 'prompt' field"):
        data.prompt_file(tmp_path / "bad.jsonl", 1)
    with pytest.raises(FileNotFoundError):
        data.prompt_file(tmp_path / "missing.jsonl", 1)


@needs_shared
def test_hs_exclude_align_skips_the_alignment_prompts():
    import evaluate
    args = evaluate.parse_args(["--data-dir", str(SHARED), "--hs-prompts",
                                str(SHARED / "harmful_prompts/advbench.jsonl"), "--n-hs", "100",
                                "--hs-exclude-align", "200", "--task", "none", "--judge", "rules"])
    prompts = evaluate.load_hs_prompts(args)
    d_a = {r["instruction"].strip() for r in data.alignment_set(data.load_safety("train", SHARED), 200)}
    assert len(prompts) == 100 and not set(prompts) & d_a
    everything = [json.loads(l)["prompt"].strip() for l in (SHARED / "harmful_prompts/advbench.jsonl").open()]
    assert prompts == [p for p in everything if p not in d_a][:100]  # the file's order, D_a's prompts skipped
    # --hs-skip K: the next prompts after the first K (recipes/other_prompts_train.sh: no prompt of the test set)
    args.hs_skip, args.n_hs = 50, 40
    assert evaluate.load_hs_prompts(args) == prompts[50:90]


def test_hs_skip_needs_a_prompt_file():
    import evaluate
    for argv in (["--hs-skip", "5"], ["--hs-prompts", "x.jsonl", "--hs-skip", "-1"]):
        with pytest.raises(ValueError, match="--hs-skip"):
            evaluate.check_args(evaluate.parse_args(argv + ["--task", "none", "--judge", "rules"]))
