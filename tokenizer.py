"""One small tokenizer interface over the formats checkpoints ship in.

- `load_tokenizer(folder)`: an HF checkpoint folder; `tokenizer.json` (Qwen2, Gemma, SmolLM2, Llama-3) through
  the `tokenizers` library, else `tokenizer.model` (Llama-2, Mistral) through `sentencepiece`.
- `tokenizer_from_gguf(reader)`: the tokenizer stored in a GGUF's metadata, byte-level BPE (`gpt2`, e.g.
  SmolLM2) or SentencePiece-style (`llama`), rebuilt as a `tokenizers` pipeline.
- BOS/EOS are added here, never by the backend's post-processor, so `encode(bos=...)` means exactly that;
  `bos=None` follows the checkpoint's own default (`add_bos`).
- Special ids come from tokenizer_config.json, special_tokens_map.json, config.json and generation_config.json,
  in that order; `stop_ids` also holds every EOS id that generation_config.json lists (e.g. `<|im_end|>`).
- Text that spells a special token (`<|im_end|>`) encodes to that single id in `tokenizer.json` and GGUF
  byte-level tokenizers, as in `transformers`; SentencePiece keeps it plain text, as raw `sentencepiece` does.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import sentencepiece
import tokenizers
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers

# llama.cpp's token types, which are SentencePiece's piece types.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class Tokenizer:
    encode_text: Callable[[str], list[int]]  # text -> ids, no special tokens added
    decode_ids: Callable[[list[int], bool], str]  # (ids, skip_special) -> text
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    add_bos: bool
    stop_ids: set[int] = field(default_factory=set)

    def encode(self, text: str, bos: bool | None = None, eos: bool = False) -> list[int]:
        bos = self.add_bos if bos is None else bos
        if (bos and self.bos_id is None) or (eos and self.eos_id is None):
            raise ValueError(f"this tokenizer has no {'BOS' if bos and self.bos_id is None else 'EOS'} token")
        return [self.bos_id] * bos + self.encode_text(text) + [self.eos_id] * eos

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.decode_ids([int(i) for i in ids], skip_special)  # also takes a tensor of ids


# --- backends


def _decode_spelling_control(ids: list[int], decode_run: Callable, is_control: Callable, piece: Callable) -> str:
    # SentencePiece drops the leading space of each decoded run, so decode the runs between control pieces
    # and spell those pieces out: "<s>Hello" rather than "<s> Hello".
    out, run = [], []
    for i in ids + [None]:
        if i is None or is_control(i):
            out += [decode_run(run)] + ([piece(i)] if i is not None else [])
            run = []
        else:
            run.append(i)
    return "".join(out)


def _from_sentencepiece(path: Path) -> tuple[sentencepiece.SentencePieceProcessor, Callable, Callable]:
    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e:
        raise ValueError(f"{path}: not a valid SentencePiece model ({e})") from None

    def decode(ids, skip_special):
        if skip_special:
            return sp.decode(ids)  # SentencePiece drops control pieces (<s>, </s>) itself
        return _decode_spelling_control(ids, sp.decode, sp.is_control, sp.id_to_piece)

    return sp, lambda text: sp.encode(text), decode


def _from_tokenizers(tok: tokenizers.Tokenizer) -> tuple[Callable, Callable]:
    encode = lambda text: tok.encode(text, add_special_tokens=False).ids  # noqa: E731
    decode = lambda ids, skip: tok.decode(ids, skip_special_tokens=skip)  # noqa: E731
    return encode, decode


# --- HF checkpoint folders


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _as_list(x) -> list[int]:
    return [] if x is None else list(x) if isinstance(x, list) else [x]


def load_tokenizer(folder: str | Path) -> Tokenizer:
    folder = Path(folder)
    tok_json, tok_model = folder / "tokenizer.json", folder / "tokenizer.model"
    if not (tok_json.is_file() or tok_model.is_file()):
        raise FileNotFoundError(f"{folder}: no tokenizer.json or tokenizer.model found")
    tok_config = _read_json(folder / "tokenizer_config.json")
    special_map = _read_json(folder / "special_tokens_map.json")
    config = _read_json(folder / "config.json")
    gen_config = _read_json(folder / "generation_config.json")

    if tok_json.is_file():
        try:
            tok = tokenizers.Tokenizer.from_file(str(tok_json))
        except Exception as e:  # the Rust side raises a bare Exception
            raise ValueError(f"{tok_json}: not a valid tokenizer.json ({e})") from None
        encode, decode = _from_tokenizers(tok)
        vocab_size, to_id, own = tok.get_vocab_size(with_added_tokens=True), tok.token_to_id, {}
    else:
        sp, encode, decode = _from_sentencepiece(tok_model)
        vocab_size = sp.get_piece_size()
        # piece_to_id answers unk for an unknown piece, so check the round trip.
        to_id = lambda s: sp.piece_to_id(s) if sp.id_to_piece(sp.piece_to_id(s)) == s else None  # noqa: E731
        own = {k: i for k, i in [("bos", sp.bos_id()), ("eos", sp.eos_id()), ("pad", sp.pad_id())] if i >= 0}

    def special_id(name: str) -> int | None:
        # The tokenizer files decide first; an explicit null there (Qwen2's bos_token) means "none".
        for source in (tok_config, special_map):
            if f"{name}_token" in source:
                token = source[f"{name}_token"]
                token = token["content"] if isinstance(token, dict) else token
                return None if token is None else to_id(token)
        for source in (config, gen_config):
            if ids := _as_list(source.get(f"{name}_token_id")):
                return ids[0]
        return own.get(name)

    bos_id, eos_id = special_id("bos"), special_id("eos")
    pad_id = special_id("pad")
    pad_id = eos_id if pad_id is None else pad_id  # many checkpoints (Llama-2, Mistral) have no pad: reuse EOS
    if "add_bos_token" in tok_config:
        add_bos = bool(tok_config["add_bos_token"])
    elif tok_json.is_file():  # ask the post-processor whether it would add BOS
        add_bos = bos_id is not None and tok.encode("", add_special_tokens=True).ids[:1] == [bos_id]
    else:
        add_bos = True  # SentencePiece checkpoints (Llama-2, Mistral) start every sequence with BOS
    stop_ids = {i for i in [eos_id, *_as_list(gen_config.get("eos_token_id"))] if i is not None}
    return Tokenizer(encode, decode, vocab_size, bos_id, eos_id, pad_id, add_bos and bos_id is not None, stop_ids)


# --- GGUF

# llama.cpp's pre-tokenizer names (`tokenizer.ggml.pre`) for byte-level BPE -> what runs before GPT-2's regex.
# The "smollm" family splits every digit on its own first (llama.cpp: "\p{N}" before the GPT-2 regex),
# which is HF SmolLM2's Sequence[Digits(individual_digits=True), ByteLevel(use_regex=True)].
_GPT2_PRE = {"default": [], "gpt2": [], "mpt": [], "olmo": [], "jais": []}
_GPT2_PRE |= {k: [pre_tokenizers.Digits(individual_digits=True)] for k in ("smollm", "starcoder", "refact")}


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _gguf_byte_level(reader, tokens: list[str], types: list[int]) -> tuple[Callable, Callable]:
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre not in _GPT2_PRE:
        raise NotImplementedError(f"GGUF pre-tokenizer {pre!r} is not supported; known: {sorted(_GPT2_PRE)}")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
    tok = tokenizers.Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = pre_tokenizers.Sequence(_GPT2_PRE[pre] + [byte_level])
    tok.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>, <|im_end|>) must match whole in text, as llama.cpp and transformers do.
    added = lambda kind: [AddedToken(t, normalized=False) for t, k in zip(tokens, types) if k == kind]  # noqa: E731
    tok.add_special_tokens(added(CONTROL))
    tok.add_tokens(added(USER_DEFINED))
    return _from_tokenizers(tok)


def _gguf_sentencepiece(reader, tokens: list[str], types: list[int]) -> tuple[Callable, Callable]:
    # SentencePiece BPE merges the adjacent pair whose union scores highest. As ranked merges (the way Llama-2's
    # tokenizer.json spells it), that is every split of a normal piece into two normal pieces, by the piece's score.
    scores = _field(reader, "tokenizer.ggml.scores")
    vocab = {t: i for i, t in enumerate(tokens)}
    normal = {t for t, k in zip(tokens, types) if k == NORMAL}
    merges = sorted(
        ((-scores[vocab[t]], vocab[t[:j]], vocab[t[j:]]), (t[:j], t[j:]))
        for t in normal for j in range(1, len(t)) if t[:j] in normal and t[j:] in normal
    )
    unk = tokens[types.index(UNKNOWN)] if UNKNOWN in types else None
    model = models.BPE(vocab, [m for _, m in merges], unk_token=unk, fuse_unk=True, byte_fallback=BYTE in types)
    tok = tokenizers.Tokenizer(model)
    prefix = _field(reader, "tokenizer.ggml.add_space_prefix", True)  # SentencePiece's add_dummy_prefix
    steps = [normalizers.Prepend("\u2581")] if prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "\u2581")])
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    encode, decode_run = _from_tokenizers(tok)

    # Control pieces stay plain vocabulary (so "<s>" in text is text, as in SentencePiece): handle them here.
    control = {i for i, k in enumerate(types) if k == CONTROL}

    def decode(ids, skip_special):
        if skip_special:
            return decode_run([i for i in ids if i not in control], False)
        run = lambda ids: decode_run(ids, False)  # noqa: E731
        return _decode_spelling_control(ids, run, control.__contains__, tokens.__getitem__)

    return encode, decode


def tokenizer_from_gguf(reader) -> Tokenizer:
    kind = _field(reader, "tokenizer.ggml.model")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise ValueError("GGUF file has no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens missing)")
    types = _field(reader, "tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    builders = {"gpt2": _gguf_byte_level, "llama": _gguf_sentencepiece}
    if kind not in builders:
        raise NotImplementedError(f"GGUF tokenizer model {kind!r} is not supported (only 'gpt2' and 'llama')")
    encode, decode = builders[kind](reader, tokens, types)

    bos_id, eos_id = _field(reader, "tokenizer.ggml.bos_token_id"), _field(reader, "tokenizer.ggml.eos_token_id")
    pad_id = _field(reader, "tokenizer.ggml.padding_token_id")
    pad_id = eos_id if pad_id is None else pad_id  # no pad in the file: reuse EOS
    # llama.cpp's default when the flag is absent: BOS for SentencePiece vocabularies, none for byte-level.
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", kind == "llama")) and bos_id is not None
    stop_ids = {_field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")} - {None}
    return Tokenizer(encode, decode, len(tokens), bos_id, eos_id, pad_id, add_bos, stop_ids)
