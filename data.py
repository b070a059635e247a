"""Data for T-Vaccine: loading, the paper's recipes, prompt formatting and batching (SPEC sections 3-5).

Features
- Loaders `load_safety`, `load_sst2`, `load_agnews`, `load_gsm8k`: from the Hugging Face Hub (BeaverTails
  gzip JSONL; SST-2 / AG News / GSM8K parquet, found with `list_repo_files`), or offline from
  `data_dir/<set>/<split>.jsonl`. Rows keep the Hub's field names; bad files fail with the path, line and field.
- Recipes: D_a (`alignment_set`), D_h (`harmful_set`), the attack mix (`attack_set`, poison disjoint from
  D_h), HS prompts (`hs_prompts`) and their calibration / final split (`HS_SPLITS`, `in_split`), FA sets
  with gold labels (`fa_set`). Asking for more rows than exist raises ValueError (no silent truncation).
- Alpaca templates (`format_prompt`), task formatting (`task_example`).
- `tokenize_example` (loss only on the target + EOS), `collate` (right/left padding), `collate_prompts`
  (left-padded generation prompts), `Batches` (seeded per-epoch shuffling, resumable via state_dict).
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch

IGNORE_INDEX = -100  # label value the cross-entropy loss skips

# ---------------------------------------------------------------- text format (SPEC section 3)

PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
SST2_INSTRUCTION = "Analyze the sentiment of the input, and respond only positive or negative"
AGNEWS_CLASSES = ("World", "Sports", "Business", "Sci/Tech")  # labels 0..3
AGNEWS_INSTRUCTION = (
    "Categorize the news article given in the input into one of the 4 categories:\n\n"
    + "\n".join(AGNEWS_CLASSES) + "\n"
)
GSM8K_SUFFIX = "\nFirst think step by step and then answer the final number.\n"
GSM8K_ANSWER = "The final answer is: "

TASKS = ("sst2", "agnews", "gsm8k")
FA_SPLIT = {"sst2": "validation", "agnews": "test", "gsm8k": "test"}  # SPEC section 4


def format_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt; the with-input template only when there is an input."""
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


# ---------------------------------------------------------------- where each data set lives

# name -> Hub repo, fields the recipes read, Hub splits, and (parquet sets) the config folders to look in.
DATASETS = {
    "safety": {"repo": "PKU-Alignment/BeaverTails", "fields": ("prompt", "response", "is_safe"),
               "splits": ("train", "test")},
    "sst2": {"repo": "stanfordnlp/sst2", "fields": ("sentence", "label"),
             "splits": ("train", "validation", "test"), "configs": ("data", "plain_text", "default")},
    "agnews": {"repo": "fancyzhx/ag_news", "fields": ("text", "label"),
               "splits": ("train", "test"), "configs": ("data", "plain_text", "default")},
    "gsm8k": {"repo": "openai/gsm8k", "fields": ("question", "answer"),
              "splits": ("train", "test"), "configs": ("main",)},
}
BEAVERTAILS_FILE = "round0/30k/{split}.jsonl.gz"


def _check_row(row, fields: tuple, where: str) -> None:
    for field in (f for f in fields if not isinstance(row, dict) or f not in row):
        raise ValueError(f"{where}: missing required field {field!r}")
    # a string "false" would read as truthy and turn a harmful row into a "safe" one
    if "is_safe" in fields and not isinstance(row["is_safe"], bool):
        raise ValueError(f"{where}: field 'is_safe' must be true/false, got {row['is_safe']!r}")


def _read_jsonl(path: Path, fields: tuple) -> list[dict]:
    """One JSON object per line (plain or .gz); errors name the file and the line."""
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {lineno}: invalid JSON ({e})") from e
            _check_row(row, fields, f"{path}, line {lineno}")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows (empty file)")
    return rows


def _read_parquet(paths: list[Path], fields: tuple) -> list[dict]:
    """Concatenated rows of a split's parquet shards; a missing column names the shard."""
    import pyarrow.parquet as pq  # only needed on the Hub path

    rows = []
    for path in paths:
        table = pq.read_table(path)
        for field in fields:
            if field not in table.column_names:
                raise ValueError(f"{path}: missing required field {field!r} (columns: {table.column_names})")
        rows.extend(table.to_pylist())
    if not rows:
        raise ValueError(f"{', '.join(map(str, paths))}: no rows (empty file)")
    return rows


# ---------------------------------------------------------------- Hugging Face Hub

def _hub(call, repo: str, *args, **kwargs):
    """Run one huggingface_hub call; a failure (network, auth, missing repo) says how to work offline."""
    import huggingface_hub

    try:
        return getattr(huggingface_hub, call)(repo, *args, repo_type="dataset", **kwargs)
    except Exception as e:  # httpx / requests / hub errors share no base class across hub versions
        raise RuntimeError(
            f"could not fetch dataset {repo!r} from the Hugging Face Hub ({type(e).__name__}: {e}). "
            "Offline, pass --data-dir with a folder of <set>/<split>.jsonl files (see docs/USAGE.md)."
        ) from e


def _parquet_files(files: list[str], split: str, configs: tuple) -> list[str]:
    """The split's parquet shards in the first config folder that has any (`data/train-0000-of-0001.parquet`,
    `main/test-....parquet`, or the converted layout `plain_text/train/0000.parquet`)."""
    def is_split(parts: list[str]) -> bool:
        return parts[-1].startswith(f"{split}-") or parts[-1] == f"{split}.parquet" or parts[-2] == split

    for config in configs:
        found = sorted(f for f in files if f.endswith(".parquet") and f.split("/")[0] == config
                       and is_split(f.split("/")))
        if found:
            return found
    return []


def _hub_rows(name: str, split: str) -> list[dict]:
    spec, repo = DATASETS[name], DATASETS[name]["repo"]
    if split not in spec["splits"]:
        raise ValueError(f"{name}: unknown split {split!r} on the Hub (have {', '.join(spec['splits'])})")
    files = list(_hub("list_repo_files", repo))
    if name == "safety":
        wanted = [BEAVERTAILS_FILE.format(split=split)]
        missing = [f for f in wanted if f not in files]
    else:
        wanted = _parquet_files(files, split, spec["configs"])
        missing = [] if wanted else [f"{'|'.join(spec['configs'])}/{split}-*.parquet"]
    if missing:
        raise RuntimeError(
            f"the layout of dataset {repo!r} on the Hub changed: {missing[0]} not found "
            f"(files there: {', '.join(sorted(files)[:20])}). Pass --data-dir with local JSONL copies."
        )
    paths = [Path(_hub("hf_hub_download", repo, f)) for f in wanted]
    if name == "safety":
        return _read_jsonl(paths[0], spec["fields"])
    return _read_parquet(paths, spec["fields"])


def _load(name: str, split: str, data_dir: str | Path | None) -> list[dict]:
    """The one place that chooses between the local folder and the Hub."""
    if data_dir is not None:
        return _read_jsonl(Path(data_dir) / name / f"{split}.jsonl", DATASETS[name]["fields"])
    return _hub_rows(name, split)


# ---------------------------------------------------------------- loaders

def load_safety(split: str, data_dir: str | Path | None = None) -> list[dict]:
    """BeaverTails 30k rows {prompt, response, is_safe, category}."""
    return _load("safety", split, data_dir)


def load_sst2(split: str, data_dir: str | Path | None = None) -> list[dict]:
    """SST-2 rows {sentence, label} (0 negative, 1 positive)."""
    return _load("sst2", split, data_dir)


def load_agnews(split: str, data_dir: str | Path | None = None) -> list[dict]:
    """AG News rows {text, label} (0 World, 1 Sports, 2 Business, 3 Sci/Tech)."""
    return _load("agnews", split, data_dir)


def load_gsm8k(split: str, data_dir: str | Path | None = None) -> list[dict]:
    """GSM8K `main` rows {question, answer}; the answer ends with `#### <number>`."""
    return _load("gsm8k", split, data_dir)


LOADERS = {"safety": load_safety, "sst2": load_sst2, "agnews": load_agnews, "gsm8k": load_gsm8k}


# ---------------------------------------------------------------- task formatting

def _label(row: dict, names: tuple) -> str:
    label = row["label"]
    if not isinstance(label, int) or not 0 <= label < len(names):
        # SST-2's Hub test split has label -1 (hidden): it cannot be trained or scored on
        raise ValueError(f"label {label!r} is not one of 0..{len(names) - 1} in row {row}")
    return names[label]


def gsm8k_gold(answer: str) -> str:
    """The number after `####`, without thousands separators, so float() reads it."""
    if "####" not in answer:
        raise ValueError(f"GSM8K answer has no '####': {answer[-80:]!r}")
    return answer.split("####")[-1].strip().replace(",", "")


def task_example(task: str, row: dict) -> dict:
    """A task row as {instruction, input, output, gold} per SPEC section 3 (gold = what FA compares)."""
    if task == "sst2":
        gold = _label(row, ("negative", "positive"))
        return {"instruction": SST2_INSTRUCTION, "input": row["sentence"], "output": gold, "gold": gold}
    if task == "agnews":
        gold = _label(row, AGNEWS_CLASSES)
        return {"instruction": AGNEWS_INSTRUCTION, "input": row["text"], "output": gold, "gold": gold}
    if task == "gsm8k":
        return {"instruction": row["question"] + GSM8K_SUFFIX, "input": "",
                "output": row["answer"].replace("####", GSM8K_ANSWER), "gold": gsm8k_gold(row["answer"])}
    raise ValueError(f"unknown task {task!r} (have {', '.join(TASKS)})")


def _pair(row: dict) -> dict:
    """A safety row as a no-input example: prompt -> response."""
    return {"instruction": row["prompt"], "input": "", "output": row["response"]}


# ---------------------------------------------------------------- recipes (SPEC section 4)

def _take(rows: list, n: int, what: str) -> list:
    if n > len(rows):
        raise ValueError(f"asked for {n} {what} but only {len(rows)} exist")
    return rows[:n]


def _unsafe(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["is_safe"] is False]


def alignment_set(rows: list[dict], n: int = 2000) -> list[dict]:
    """D_a: the first n safe rows of the safety train split, prompt -> safe response."""
    return [_pair(r) for r in _take([r for r in rows if r["is_safe"] is True], n, "safe rows")]


def harmful_set(rows: list[dict], n: int = 200) -> list[dict]:
    """D_h: the first n unsafe rows, prompt -> harmful response (used only to score layers)."""
    return [_pair(r) for r in _take(_unsafe(rows), n, "unsafe rows")]


def attack_set(task_rows: list[dict], safety_rows: list[dict], task: str, n: int = 1000, p: float = 0.1,
               n_harmful_defender: int = 200, seed: int = 42) -> list[dict]:
    """The attacker's fine-tuning set: the first n - round(p*n) task train rows plus round(p*n) unsafe
    rows taken after the defender's first `n_harmful_defender` (so disjoint from D_h), shuffled with seed.
    Each example carries `harmful` (bool) so runs can report the mix."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    n_harm = round(p * n)
    benign = [{**task_example(task, r), "harmful": False}
              for r in _take(task_rows, n - n_harm, f"{task} train rows")]
    unsafe = _unsafe(safety_rows)
    needed = n_harmful_defender + n_harm
    if needed > len(unsafe):
        raise ValueError(f"asked for {n_harm} unsafe rows after the defender's {n_harmful_defender} "
                         f"({needed} in all) but only {len(unsafe)} exist")
    harmful = [{**_pair(r), "harmful": True} for r in unsafe[n_harmful_defender:needed]]
    mixed = benign + harmful
    order = torch.randperm(len(mixed), generator=torch.Generator().manual_seed(seed)).tolist()
    return [mixed[i] for i in order]


def hs_prompts(test_rows: list[dict], n: int = 500) -> list[str]:
    """The first n distinct prompts of the safety test split with is_safe false (HS evaluation)."""
    distinct = list(dict.fromkeys(r["prompt"] for r in _unsafe(test_rows)))  # keeps first-seen order
    return _take(distinct, n, "distinct unsafe prompts")


def prompt_file(path: str | Path, n: int, exclude: set[str] = frozenset(), skip: int = 0) -> list[str]:
    """The first n distinct prompts of a JSONL file with a `prompt` field per line (e.g. the AdvBench or
    Do-Not-Answer copies in ../shared/data/harmful_prompts/), leaving out those in `exclude` (e.g. D_a's prompts)
    and then the first `skip` (e.g. the prompts another labelled set used, so two sets never share a prompt)."""
    if skip < 0:
        raise ValueError(f"skip must be >= 0, got {skip}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such prompt file (a JSONL file with a 'prompt' field per line)")
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            if not isinstance(row, dict) or not str(row.get("prompt", "")).strip():
                raise ValueError(f"{path}, line {number}: no 'prompt' field")
            prompts.append(row["prompt"].strip())
    distinct = [p for p in dict.fromkeys(prompts) if p not in exclude][skip:]
    return _take(distinct, n, f"distinct prompts in {path.name}" + (" outside the excluded set" if exclude else "")
                 + (f" after the first {skip}" if skip else ""))


HS_SPLITS = ("all", "calib", "final")


def in_split(index: int, split: str) -> bool:
    """The HS prompts are split once for the study: every 4th prompt (index % 4 == 0) calibrates the settings,
    the rest makes the final table, so no setting is chosen on the prompts it is reported on."""
    return split == "all" or (index % 4 == 0) == (split == "calib")


def fa_set(task: str, rows: list[dict], n: int = 500) -> list[dict]:
    """The first n rows of the FA split (FA_SPLIT[task]) as examples with a `gold` answer."""
    return [task_example(task, r) for r in _take(rows, n, f"{task} rows")]


# ---------------------------------------------------------------- tokenization and batching

def tokenize_example(tokenizer, example: dict, max_len: int = 200) -> tuple[list[int], list[int]]:
    """(input_ids, labels): prompt (with the tokenizer's own BOS) + target + EOS, right-truncated to
    max_len; labels are IGNORE_INDEX on prompt tokens. Prompt and target are encoded separately so the
    mask boundary is exact."""
    prompt = tokenizer.encode(format_prompt(example["instruction"], example.get("input", "")))
    target = tokenizer.encode(example["output"], bos=False) + [tokenizer.eos_id]
    input_ids = (prompt + target)[:max_len]
    labels = ([IGNORE_INDEX] * len(prompt) + target)[:max_len]
    return input_ids, labels


def tokenize_dataset(tokenizer, examples: list[dict], max_len: int, name: str) -> list[tuple[list, list]]:
    """tokenize_example over a set, dropping (and reporting) examples whose target was truncated away:
    they carry no loss, and a batch made only of them would have nothing to learn from."""
    pairs = [tokenize_example(tokenizer, ex, max_len) for ex in examples]
    kept = [(ids, labels) for ids, labels in pairs if any(t != IGNORE_INDEX for t in labels)]
    if len(kept) < len(pairs):
        print(f"[data] {name}: dropped {len(pairs) - len(kept)} of {len(pairs)} examples whose prompt alone "
              f"fills --max-len {max_len}")
    if not kept:
        raise ValueError(f"{name}: no example keeps a target token within --max-len {max_len}")
    return kept


def pad_id_of(tokenizer) -> int:
    """The pad id; Llama-style tokenizers have none, and EOS is safe as padding under the attention mask."""
    return tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int, side: str = "right") -> dict:
    """Pad (input_ids, labels) pairs to the longest: input_ids (B,T), attention_mask (B,T) 1 on tokens,
    labels (B,T) with IGNORE_INDEX on padding. side="left" keeps the last token of each row aligned."""
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    width = max(len(ids) for ids, _ in batch)
    out = {k: torch.full((len(batch), width), v, dtype=torch.long)
           for k, v in (("input_ids", pad_id), ("attention_mask", 0), ("labels", IGNORE_INDEX))}
    for i, (ids, labels) in enumerate(batch):
        cols = slice(0, len(ids)) if side == "right" else slice(width - len(ids), width)
        out["input_ids"][i, cols] = torch.tensor(ids, dtype=torch.long)
        out["attention_mask"][i, cols] = 1
        out["labels"][i, cols] = torch.tensor(labels, dtype=torch.long)
    return out


def collate_prompts(tokenizer, prompts: list[str]) -> dict:
    """Left-padded generation batch {input_ids, attention_mask} of already formatted prompts."""
    encoded = [tokenizer.encode(p) for p in prompts]
    batch = collate([(ids, ids) for ids in encoded], pad_id_of(tokenizer), side="left")
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


class Batches:
    """Padded batches over tokenized examples, in a seeded permutation per epoch (drop_last False).

    Each `for batch in batches` runs the rest of the current epoch; the position advances as batches are
    handed out and rolls to the next epoch after the last one, so `state_dict()` taken after any step
    and loaded into a fresh Batches gives exactly the remaining batches of the interrupted run."""

    def __init__(self, data: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int,
                 seed: int = 0, shuffle: bool = True):
        if not data or batch_size < 1:
            raise ValueError(f"need data and batch_size >= 1 (got {len(data)} examples, batch {batch_size})")
        self.data, self.batch_size, self.pad_id = data, batch_size, pad_id
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.position = 0, 0

    def __len__(self) -> int:
        return -(-len(self.data) // self.batch_size)

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.data)))
        # one generator per (seed, epoch): the order of epoch e does not depend on how far others ran
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.data), generator=g).tolist()

    def __iter__(self):
        order = self._order(self.epoch)
        for pos in range(self.position, len(self)):
            chunk = order[pos * self.batch_size:(pos + 1) * self.batch_size]
            self.position = pos + 1
            if self.position == len(self):
                self.epoch, self.position = self.epoch + 1, 0
            yield collate([self.data[i] for i in chunk], self.pad_id)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_examples": len(self.data)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_examples", len(self.data)) != len(self.data):
            raise ValueError(f"state is for {state['num_examples']} examples, this data has {len(self.data)}")
        self.epoch, self.position, self.seed = state["epoch"], state["position"], state["seed"]
