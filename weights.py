"""Read model checkpoints into plain tensors with Hugging Face names (no model classes here).

- `download_from_hub`: fetch only what is needed (config, tokenizer, weights) from the Hugging Face
  Hub into its usual cache; safetensors are preferred and legacy `.bin` files are fetched only when
  a repo has no safetensors. HF_TOKEN / HF_HOME / HF_HUB_OFFLINE are honoured by huggingface_hub.
- `read_config`: the folder's config.json as a dict.
- `weight_files`: which weight files of a folder to read (single file, sharded index, legacy .bin).
- `iter_tensors`: stream (name, tensor) pairs one at a time so a large model never sits in memory
  twice; `.bin` files are unpickled with `weights_only=True`, so they cannot run code.
- `read_gguf`: a llama GGUF file (e.g. the offline SmolLM2) as an HF-style config dict plus an
  HF `LlamaForCausalLM` state dict in float32, dequantized and with llama.cpp's q/k permutation undone.
- Every problem a user can cause with files raises `CheckpointError` with a message that names the
  file or repo, instead of a raw traceback from deep inside torch or safetensors.
"""
from __future__ import annotations

import contextlib
import json
import pickle
import re
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch

if TYPE_CHECKING:
    import gguf


class CheckpointError(Exception):
    """A checkpoint, config or Hub download problem, explained for the user."""


HUB_FILE_PATTERNS: list[str] = [
    "config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
]
# Legacy weights, used only when a repo has no safetensors at all. `pytorch_model*.bin` rather than
# `*.bin` so that training_args.bin, optimizer states and the like are not downloaded.
LEGACY_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]


# ----------------------------------------------------------------------------------- Hub download
def _hub_patterns(repo_files: list[str]) -> list[str]:
    """Choose allow_patterns from the repo's file list."""
    names = [f for f in repo_files if "/" not in f]  # weights live at the repo root
    if not any(f.endswith(".safetensors") for f in names):
        return [p for p in HUB_FILE_PATTERNS if p != "*.safetensors"] + LEGACY_PATTERNS
    if "model.safetensors" in names or "model.safetensors.index.json" in names:
        # Some repos (e.g. Mistral) also ship consolidated.safetensors: the same weights a second time.
        return [p if p != "*.safetensors" else "model*.safetensors" for p in HUB_FILE_PATTERNS]
    return list(HUB_FILE_PATTERNS)


def _network_errors() -> tuple[type[BaseException], ...]:
    """Exception classes meaning 'the Hub could not be reached' (the HTTP stack varies by version)."""
    from huggingface_hub import errors
    found: list[type[BaseException]] = [ConnectionError, TimeoutError, errors.LocalEntryNotFoundError]
    for module, name in [("requests", "ConnectionError"), ("requests", "Timeout"),
                         ("httpx", "TransportError"), ("httpx2", "TransportError")]:
        with contextlib.suppress(ImportError):
            found.append(getattr(__import__(module), name))
    return tuple(found)


@contextlib.contextmanager
def _hub_errors(repo_id: str):
    """Translate huggingface_hub exceptions into CheckpointError with advice."""
    from huggingface_hub import constants, errors
    try:
        yield
    except errors.GatedRepoError as e:  # before RepositoryNotFoundError: it is a subclass
        raise CheckpointError(f"{repo_id} is gated: accept the licence on huggingface.co/{repo_id} "
                              "and set HF_TOKEN to a token of that account") from e
    except errors.RepositoryNotFoundError as e:
        raise CheckpointError(f"{repo_id} was not found on the Hugging Face Hub (check the name; "
                              "for a private repo set HF_TOKEN)") from e
    except errors.RevisionNotFoundError as e:
        raise CheckpointError(f"{repo_id} has no such revision: {e}") from e
    except _network_errors() as e:
        raise CheckpointError(f"cannot reach the Hugging Face Hub and {repo_id} is not in the local "
                              f"cache (HF_HOME={constants.HF_HOME}): {type(e).__name__}: {e}") from e
    except errors.HfHubHTTPError as e:
        raise CheckpointError(f"the Hugging Face Hub refused {repo_id}: {e}") from e
    except errors.HFValidationError as e:
        raise CheckpointError(f"{repo_id!r} is not a valid Hub repo id: {e}") from e


def download_from_hub(repo_id: str, revision: str | None = None) -> Path:
    """Download config, tokenizer and weights of `repo_id` (or reuse the cache); return the folder."""
    import huggingface_hub as hf
    from huggingface_hub import errors
    with _hub_errors(repo_id):
        try:
            # model_info is one request (list_repo_files retries for ~20 s when offline).
            info = hf.HfApi().model_info(repo_id, revision=revision)
        except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError):
            raise  # also GatedRepoError; _hub_errors explains them
        except (*_network_errors(), errors.HfHubHTTPError) as unreachable:  # offline, or Hub down
            return _cached_snapshot(repo_id, revision, unreachable)
        patterns = _hub_patterns([s.rfilename for s in info.siblings or []])
        return Path(hf.snapshot_download(repo_id, revision=revision, allow_patterns=patterns))


def _cached_snapshot(repo_id: str, revision: str | None, unreachable: Exception) -> Path:
    """The cached snapshot when the Hub is unreachable; weight_files() later checks it is complete."""
    import huggingface_hub as hf
    from huggingface_hub import errors
    try:
        return Path(hf.snapshot_download(repo_id, revision=revision, local_files_only=True,
                                         allow_patterns=["config.json"]))
    except errors.LocalEntryNotFoundError:
        raise unreachable from None  # the real cause; _hub_errors words it for the user


# ------------------------------------------------------------------------------- local checkpoints
def read_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"no config.json in {folder}: is this a Hugging Face model folder?")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not {type(config).__name__}")
    return config


def _shards(index: Path) -> list[Path]:
    """The files an index's weight_map points at, in first-use order; all must exist."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = list(dict.fromkeys(weight_map.values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index} is not a valid shard index ({type(e).__name__}: {e})") from e
    files = [index.parent / name for name in names]
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{index} lists shard {f.name}, which is missing from {index.parent}")
    return files


def weight_files(folder: Path) -> list[Path]:
    """The weight files to read, preferring safetensors; legacy .bin only when there are none."""
    folder = Path(folder)
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    if (folder / "model.safetensors.index.json").is_file():
        return _shards(folder / "model.safetensors.index.json")
    if found := sorted(folder.glob("*.safetensors")):
        return found
    if (folder / "pytorch_model.bin").is_file():
        return [folder / "pytorch_model.bin"]
    if (folder / "pytorch_model.bin.index.json").is_file():
        return _shards(folder / "pytorch_model.bin.index.json")
    raise CheckpointError(f"no weights in {folder}: looked for model.safetensors, "
                          "model.safetensors.index.json, *.safetensors, pytorch_model.bin and "
                          "pytorch_model.bin.index.json")


def _corrupt(path: Path, e: Exception) -> CheckpointError:
    return CheckpointError(f"cannot read {path}: the file is truncated or corrupt "
                           f"(re-download it) [{type(e).__name__}: {str(e)[:300]}]")


def _iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open
    try:
        handle = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, RuntimeError) as e:
        raise _corrupt(path, e) from e
    with handle:
        for name in handle.keys():
            try:
                tensor = handle.get_tensor(name)
            except (SafetensorError, OSError, RuntimeError) as e:
                raise _corrupt(path, e) from e
            yield name, tensor  # outside the try: errors in the caller's loop are not ours


def _load_bin(path: Path) -> dict:
    try:
        # weights_only=True refuses any pickled object other than tensors and plain containers,
        # so a malicious .bin cannot run code. mmap only works for the zip format (torch >= 1.6).
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refusing to load {path}: it contains pickled objects other than "
                              f"tensors, which could run arbitrary code [{str(e)[:300]}]") from e
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise _corrupt(path, e) from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    return state


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) from every file, lazily (one safetensors tensor at a time)."""
    for path in map(Path, files):
        if path.suffix == ".safetensors":
            yield from _iter_safetensors(path)
            continue
        state = _load_bin(path)
        for name in list(state):
            tensor = state.pop(name)  # drop our reference as we go
            if not isinstance(tensor, torch.Tensor):
                raise CheckpointError(f"{path}: entry {name!r} is a {type(tensor).__name__}, not a tensor")
            yield name, tensor


# ---------------------------------------------------------------------------------------- GGUF
_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_GGUF_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                   "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GGUF_TOP_NAMES:
        return _GGUF_TOP_NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", gguf_name)
    if m and m.group(2) in _GGUF_LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_GGUF_LAYER_NAMES[m.group(2)]}.weight"
    raise CheckpointError(f"unsupported tensor {gguf_name!r} in GGUF file (only plain llama is supported)")


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf's q/k row permutation (interleaved RoPE -> HF's rotate-half layout).

    llama.cpp stores each head's rows as (dim/2, 2) pairs; HF stores them as (2, dim/2) halves.
    """
    out, inp = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def _gguf_value(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    if hasattr(field, "contents"):
        return field.contents()
    value = field.parts[field.data[0]]  # gguf < 0.11 has no contents()
    return bytes(value).decode("utf-8") if field.types[0].name == "STRING" else value.item()


def _gguf_config(reader, path: Path) -> dict:
    arch = _gguf_value(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama')")

    def get(key, default=None):
        value = _gguf_value(reader, f"llama.{key}", default)
        if value is None:
            raise CheckpointError(f"{path}: GGUF metadata lacks llama.{key}")
        return value

    hidden, heads = get("embedding_length"), get("attention.head_count")
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise CheckpointError(f"{path}: GGUF file has no token_embd.weight tensor")
    return {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden, "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"), "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": get("attention.key_length", hidden // heads),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon"),
        "rope_theta": get("rope.freq_base", 10000.0),
        # Older converters omit llama.vocab_size; the embedding's row count (ne1) is authoritative.
        "vocab_size": get("vocab_size", int(tensors["token_embd.weight"].shape[1])),
        "max_position_embeddings": get("context_length"),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": _gguf_value(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _gguf_value(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _gguf_value(reader, "tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }


def read_gguf(path: Path) -> tuple[dict, dict[str, torch.Tensor], gguf.GGUFReader]:
    """Read a llama GGUF file: (HF config dict, HF state dict in float32, reader for the tokenizer)."""
    import gguf
    path = Path(path)
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise CheckpointError(f"cannot read {path}: not a valid GGUF file [{type(e).__name__}: {e}]") from e
    config = _gguf_config(reader, path)
    state = {}
    for t in reader.tensors:
        name = _hf_name(t.name)
        # GGUF lists dims innermost first (ne0 = input features), HF wants (out, in).
        shape = [int(n) for n in reversed(t.shape.tolist())]
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        if data.dtype != np.float32 or not data.flags.writeable:
            data = data.astype(np.float32)  # F32/F16 come back as views of the read-only mmap
        w = torch.from_numpy(data).reshape(shape)
        if t.name.endswith("attn_q.weight"):
            w = _unpermute(w, config["num_attention_heads"])
        elif t.name.endswith("attn_k.weight"):
            w = _unpermute(w, config["num_key_value_heads"])
        state[name] = w.contiguous()
    return config, state, reader
