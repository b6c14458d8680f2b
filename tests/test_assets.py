"""Any GGUF base model: dequantised once, cached under $TTMM_HOME by the sha256 of its bytes.

The GGUF files are written here with the ``gguf`` package: a one-block Llama with a byte-level
tokenizer of 258 tokens, its embedding quantised to Q8_0, so a load takes a second or two.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from ttmm import assets
from ttmm.assets import (
    AssetError,
    base_model_name,
    gguf_cache_dir,
    load_base_model,
    resolve_base_model,
)

HIDDEN, FFN, HEADS, KV_HEADS = 32, 64, 2, 1


def write_tiny_gguf(path, seed: int = 0) -> dict[str, np.ndarray]:
    """A loadable Llama GGUF at ``path``; returns the fp32 tensors written unquantised."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = [*bytes_to_unicode().values(), "Ġt", "<|endoftext|>"]
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - 1) + [3])  # the last one is special
    writer.add_token_merges(["Ġ t"])
    writer.add_bos_token_id(len(tokens) - 1)
    writer.add_eos_token_id(len(tokens) - 1)
    rng = np.random.default_rng(seed)

    def weight(*shape):
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    embedding = weight(len(tokens), HIDDEN)
    writer.add_tensor(
        "token_embd.weight",
        quantize(embedding, GGMLQuantizationType.Q8_0),
        raw_dtype=GGMLQuantizationType.Q8_0,
    )
    head_dim = HIDDEN // HEADS
    plain = {
        "output_norm.weight": np.ones(HIDDEN, np.float32),
        "blk.0.attn_norm.weight": np.ones(HIDDEN, np.float32),
        "blk.0.ffn_norm.weight": np.ones(HIDDEN, np.float32),
        "blk.0.attn_q.weight": weight(HIDDEN, HIDDEN),
        "blk.0.attn_k.weight": weight(KV_HEADS * head_dim, HIDDEN),
        "blk.0.attn_v.weight": weight(KV_HEADS * head_dim, HIDDEN),
        "blk.0.attn_output.weight": weight(HIDDEN, HIDDEN),
        "blk.0.ffn_gate.weight": weight(FFN, HIDDEN),
        "blk.0.ffn_up.weight": weight(FFN, HIDDEN),
        "blk.0.ffn_down.weight": weight(HIDDEN, FFN),
    }
    for name, tensor in plain.items():
        writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return plain | {"token_embd.weight": embedding}


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("TTMM_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def dequantised(monkeypatch) -> list:
    """The GGUF files dequantised during the test, in order."""
    calls = []
    real = assets._dequantise

    def spy(gguf, target):
        calls.append(gguf)
        return real(gguf, target)

    monkeypatch.setattr(assets, "_dequantise", spy)
    return calls


def test_a_gguf_is_dequantised_once_and_cached_by_its_hash(tmp_path, home, dequantised):
    written = write_tiny_gguf(tmp_path / "a.gguf", seed=0)
    model, tokenizer = load_base_model(tmp_path / "a.gguf", dtype="float32", device="cpu")
    cache = gguf_cache_dir(tmp_path / "a.gguf")
    assert cache.parent == home / "models" and (cache / "config.json").is_file()
    assert dequantised == [tmp_path / "a.gguf"]
    assert type(model).__name__ == "LlamaForCausalLM" and tokenizer.pad_token is not None
    v_proj = model.model.layers[0].self_attn.v_proj.weight
    assert torch.equal(v_proj, torch.from_numpy(written["blk.0.attn_v.weight"]))
    embedding = model.model.embed_tokens.weight  # Q8_0: within half a quantisation step
    assert (embedding - torch.from_numpy(written["token_embd.weight"])).abs().max() < 1e-3
    ids = tokenizer("the cat", return_tensors="pt")["input_ids"]
    assert tokenizer.decode(ids[0]) == "the cat" and model(ids).logits.shape[-1] == 258

    # the same bytes elsewhere: the same cache, nothing dequantised again
    (tmp_path / "moved").mkdir()
    shutil.copy(tmp_path / "a.gguf", tmp_path / "moved" / "copy.gguf")
    assert resolve_base_model(tmp_path / "moved" / "copy.gguf") == str(cache)
    assert resolve_base_model(str(tmp_path / "a.gguf")) == str(cache)
    assert len(dequantised) == 1

    # other bytes: their own cache
    write_tiny_gguf(tmp_path / "b.gguf", seed=1)
    other = resolve_base_model(tmp_path / "b.gguf")
    assert other != str(cache) and dequantised[-1] == tmp_path / "b.gguf"
    assert sorted(p.name for p in (home / "models").iterdir()) == sorted(
        [cache.name, gguf_cache_dir(tmp_path / "b.gguf").name]
    )


def test_bad_gguf_files_fail_with_one_clear_error(tmp_path, home):
    with pytest.raises(AssetError, match="does not exist"):
        resolve_base_model(tmp_path / "missing.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(AssetError, match="cannot dequantise"):
        resolve_base_model(tmp_path / "junk.gguf")
    assert not any(p.name.startswith("gguf-") for p in (home / "models").glob("*"))


def test_a_bank_records_a_gguf_by_its_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert base_model_name("models/x.gguf") == str(tmp_path / "models" / "x.gguf")
    assert base_model_name(None) == assets.DEFAULT_BASE_MODEL
    assert base_model_name("some/hub-id") == "some/hub-id"
