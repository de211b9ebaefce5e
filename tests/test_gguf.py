"""The GGUF reader against transformers' own GGUF loader.

Tiny random Qwen2 / Qwen2-MoE models are written as llama.cpp's convert_hf_to_gguf.py writes
them (names from gguf-py's tensor map, experts stacked [E, out, in], the shared-expert gate 1-D,
1-D tensors and the router kept F32), in F32, F16 and Q8_0, one with the real Qwen2 vocabulary.
Our GGUFCheckpoint and transformers must then agree: config, every tensor bit for bit, token ids
and chat text; and each bad input must fail with a GGUFError that says what is wrong.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from conftest import MOE, TINY, make_hf_model, make_hf_moe_model
from qwen2_jax.config import Qwen2Config
from qwen2_jax.tokenizer import QWEN2_CHAT_TEMPLATE, Tokenizer

gguf = pytest.importorskip("gguf")
from qwen2_jax.checkpoint.gguf_io import GGUFCheckpoint, GGUFError  # noqa: E402

Q = gguf.GGMLQuantizationType
T = gguf.TokenType

# Qwen2.5's added tokens after <|endoftext|>, <|im_start|>, <|im_end|> (151643-151645): llama.cpp
# marks `<|...|>` control and the rest user-defined.
QWEN25_ADDED = ["<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
                "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
                "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                "<|repo_name|>", "<|file_sep|>"]
QWEN25_VOCAB = 151936  # the embedding rows; the token list is padded to them

# Row lengths divisible by 32 (Q8_0 blocks): q/k/v/o/gate/up rows 64, down rows 96 / 32.
DENSE_Q8 = dict(hidden_size=64, intermediate_size=96, tie_word_embeddings=True)
MOE_Q8 = dict(hidden_size=64, intermediate_size=160, moe_intermediate_size=32,
              shared_expert_intermediate_size=96)


def qwen25_tokens(tokenizer_dir) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) as llama.cpp writes Qwen2.5's vocabulary."""
    data = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = {i: t for t, i in data["model"]["vocab"].items()}
    vocab |= {a["id"]: a["content"] for a in data["added_tokens"]}
    specials = len(vocab)  # 151646
    vocab |= {specials + i: t for i, t in enumerate(QWEN25_ADDED)}
    tokens, types = [], []
    for i in range(QWEN25_VOCAB):
        token = vocab.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
        else:
            tokens.append(token)
            added = i >= specials - 3
            looks_special = token.startswith("<|") and token.endswith("|>")
            types.append(T.NORMAL if not added else T.CONTROL if looks_special else T.USER_DEFINED)
    merges = [" ".join(m) if isinstance(m, list) else m for m in data["model"]["merges"]]
    return tokens, types, merges


def small_tokens(n: int) -> tuple[list[str], list[int], None]:
    """A made-up byte-level vocabulary of n tokens, the last two control tokens."""
    from tokenizers import pre_tokenizers

    tokens = [*sorted(pre_tokenizers.ByteLevel.alphabet())[:n - 2], "<|endoftext|>", "<|im_end|>"]
    return tokens, [T.NORMAL] * (n - 2) + [T.CONTROL] * 2, None


def write_gguf(path, hf_folder, qtype, vocab, *, types=None, drop=(), extra=None,
               rope_yarn=None, head_count_kv=None) -> None:
    """Writes the HF checkpoint in `hf_folder` as llama.cpp's converter would.

    qtype: the type of 2-D tensors (1-D and the router stay F32); `types` overrides it by GGUF
    name fragment. `drop`: tensor names or metadata keys to leave out; `extra`: more tensors.
    """
    hf = json.loads((hf_folder / "config.json").read_text())
    weights = {}
    for name in sorted(os.listdir(hf_folder)):
        if name.endswith(".safetensors"):
            weights |= load_file(hf_folder / name)
    moe = hf["model_type"] == "qwen2_moe"
    arch = gguf.MODEL_ARCH.QWEN2MOE if moe else gguf.MODEL_ARCH.QWEN2
    names = gguf.get_tensor_name_map(arch, hf["num_hidden_layers"])
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name("tiny")
    writer.add_block_count(hf["num_hidden_layers"])
    writer.add_context_length(hf["max_position_embeddings"])
    writer.add_embedding_length(hf["hidden_size"])
    writer.add_feed_forward_length(hf["intermediate_size"])
    writer.add_head_count(hf["num_attention_heads"])
    writer.add_head_count_kv(head_count_kv or hf["num_key_value_heads"])
    writer.add_rope_freq_base(hf.get("rope_theta") or hf["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(hf["rms_norm_eps"])
    writer.add_file_type({Q.F32: 0, Q.F16: 1, Q.Q8_0: 7}[qtype])
    if moe:
        writer.add_expert_count(hf["num_experts"])
        writer.add_expert_used_count(hf["num_experts_per_tok"])
        writer.add_expert_feed_forward_length(hf["moe_intermediate_size"])
        writer.add_expert_shared_feed_forward_length(hf["shared_expert_intermediate_size"])
    if rope_yarn:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope_yarn[0])
        writer.add_rope_scaling_orig_ctx_len(rope_yarn[1])
    tokens, token_types, merges = vocab
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    if merges:
        writer.add_token_merges(merges)
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_pad_token_id(tokens.index("<|endoftext|>"))
    writer.add_bos_token_id(tokens.index("<|endoftext|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(QWEN2_CHAT_TEMPLATE)
    if qtype != Q.F32:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    # llama.cpp stacks each layer's experts: model.layers.N.mlp.experts.{proj}.weight [E, out, in]
    for layer in range(hf["num_hidden_layers"]) if moe else ():
        for proj in ("gate_proj", "up_proj", "down_proj"):
            prefix = f"model.layers.{layer}.mlp.experts"
            weights[f"{prefix}.{proj}.weight"] = np.stack(
                [weights.pop(f"{prefix}.{j}.{proj}.weight") for j in range(hf["num_experts"])])
    for hf_name, data in {**weights, **(extra or {})}.items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias")) or hf_name
        if name in drop:
            continue
        data = np.squeeze(data) if name.endswith("ffn_gate_inp_shexp.weight") else data  # [D]
        kind = next((t for part, t in (types or {}).items() if part in name), qtype)
        if data.ndim <= 1 or name.endswith("ffn_gate_inp.weight"):
            kind = Q.F32
        if kind == Q.F32:
            writer.add_tensor(name, data.astype(np.float32))
        elif kind == Q.F16:
            writer.add_tensor(name, data.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)
    for key in drop:
        writer.kv_data[0].pop(key, None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory, qwen2_tokenizer_dir):
    """name -> (gguf path, source HF folder): dense F32 and F16 (with yarn), dense Q8_0 with
    tied embeddings, MoE Q8_0 with F16 attention, and a Q8_0 model with the real Qwen2.5
    vocabulary (151,936 rows) for the tokenizer."""
    root = tmp_path_factory.mktemp("gguf")
    sources = {"dense": {}, "dense_q8": DENSE_Q8, "moe": MOE_Q8,
               "dense_qwen25": {**DENSE_Q8, "vocab_size": QWEN25_VOCAB, "num_hidden_layers": 1}}
    for name, kwargs in sources.items():
        (root / name).mkdir()
        (make_hf_moe_model if name == "moe" else make_hf_model)(root / name, **kwargs)
    small = small_tokens(TINY["vocab_size"])
    out = {}
    for name, source, qtype, vocab, kwargs in [
        ("f32.gguf", "dense", Q.F32, small, {}),
        ("f16.gguf", "dense", Q.F16, small, {"rope_yarn": (4.0, 128)}),
        ("q8.gguf", "dense_q8", Q.Q8_0, small, {}),
        ("moe.gguf", "moe", Q.Q8_0, small_tokens(MOE["vocab_size"]), {"types": {"attn_": Q.F16}}),
        ("qwen25.gguf", "dense_qwen25", Q.Q8_0, qwen25_tokens(qwen2_tokenizer_dir), {}),
    ]:
        write_gguf(root / name, root / source, qtype, vocab, **kwargs)
        out[name] = (root / name, root / source)
    return out


def transformers_model(path, config=None):
    from transformers import AutoModelForCausalLM

    kwargs = {} if config is None else {"config": config}
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                dtype=torch.float32, **kwargs)


def transformers_config(path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)


def per_expert(state: dict) -> dict:
    """transformers 5's fused experts (gate_up_proj [E, 2F, D], down_proj [E, D, F]) under the
    per-expert names they are saved with (gate first, as its GGUF loader fills them)."""
    out = {}
    for name, value in state.items():
        value = value.numpy()
        if name.endswith("mlp.experts.gate_up_proj"):
            half = value.shape[1] // 2
            for j, w in enumerate(value):
                out[f"{name[:-len('gate_up_proj')]}{j}.gate_proj.weight"] = w[:half]
                out[f"{name[:-len('gate_up_proj')]}{j}.up_proj.weight"] = w[half:]
        elif name.endswith("mlp.experts.down_proj"):
            for j, w in enumerate(value):
                out[f"{name[:-len('down_proj')]}{j}.down_proj.weight"] = w
        else:
            out[name] = value
    return out


# The config fields our Qwen2Config uses that transformers reads from a GGUF file.
SHARED_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size",
                 "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_size",
                 "max_position_embeddings", "rope_theta", "tie_word_embeddings", "hidden_act",
                 "bos_token_id", "eos_token_id", "pad_token_id", "layer_windows", "sparse_layers")
MOE_FIELDS = ("num_experts", "num_experts_per_tok", "norm_topk_prob", "decoder_sparse_step",
              "mlp_only_layers")


@pytest.mark.parametrize("name", ["f32.gguf", "f16.gguf", "q8.gguf", "moe.gguf"])
def test_config_matches_transformers(files, name):
    path, source = files[name]
    ours = Qwen2Config.from_hf(GGUFCheckpoint(path).config())
    theirs = Qwen2Config.from_hf(transformers_config(path).to_dict())
    fields = SHARED_FIELDS + (MOE_FIELDS if ours.model_type == "qwen2_moe" else ())
    for field in fields:
        assert getattr(ours, field) == getattr(theirs, field), field
    assert np.float32(ours.rms_norm_eps) == np.float32(theirs.rms_norm_eps)
    assert ours.rms_norm_eps == 1e-6  # the shortest decimal of the file's float32
    # transformers leaves architectures null; a config.json from the hub names the class.
    assert ours.extra["architectures"] == (
        ("Qwen2MoeForCausalLM",) if name == "moe.gguf" else ("Qwen2ForCausalLM",))
    # What transformers loses, we keep: the source model's own values.
    source_config = Qwen2Config.from_file(source)
    if ours.model_type == "qwen2_moe":
        for field in ("moe_intermediate_size", "shared_expert_intermediate_size"):
            assert getattr(ours, field) == getattr(source_config, field), field
        assert theirs.moe_intermediate_size == 1408  # transformers' default, not the file's 32
    expected_scaling = ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}
                        if name == "f16.gguf" else None)
    assert (dict(ours.rope_scaling) if ours.rope_scaling else None) == expected_scaling
    assert ours.tie_word_embeddings == (name == "q8.gguf")
    assert ours.vocab_size == source_config.vocab_size


@pytest.mark.parametrize("name", ["f32.gguf", "f16.gguf", "q8.gguf", "moe.gguf"])
def test_tensors_bit_identical_to_transformers(files, name):
    path, source = files[name]
    ckpt = GGUFCheckpoint(path)
    config = None
    if "moe" in name:  # transformers ignores the expert sizes in the file; give them
        config = transformers_config(path)
        ours_config = ckpt.config()
        config.moe_intermediate_size = ours_config["moe_intermediate_size"]
        config.shared_expert_intermediate_size = ours_config["shared_expert_intermediate_size"]
    theirs = per_expert(transformers_model(path, config).state_dict())
    if ckpt.config()["tie_word_embeddings"]:
        np.testing.assert_array_equal(theirs.pop("lm_head.weight"),
                                      theirs["model.embed_tokens.weight"])
    assert sorted(ckpt.hf_names()) == sorted(theirs)
    for hf_name in ckpt.hf_names():
        ours = ckpt.read(hf_name)
        assert ours.dtype == np.float32, hf_name
        np.testing.assert_array_equal(ours, theirs[hf_name], err_msg=hf_name)
    if name == "f32.gguf":  # lossless: the source checkpoint itself, whatever transformers does
        source_weights = load_file(source / "model.safetensors")
        assert sorted(source_weights) == sorted(ckpt.hf_names())
        for hf_name, value in source_weights.items():
            np.testing.assert_array_equal(ckpt.read(hf_name), value, err_msg=hf_name)


def test_types_and_each_byte_dequantized_once(files, monkeypatch):
    path = files["moe.gguf"][0]
    ckpt = GGUFCheckpoint(path)
    assert ckpt.dtype("model.layers.0.mlp.experts.3.down_proj.weight") == "Q8_0"
    assert ckpt.dtype("model.layers.0.self_attn.q_proj.weight") == "F16"
    assert ckpt.dtype("model.layers.0.self_attn.q_proj.bias") == "F32"
    assert ckpt.dtype("model.layers.0.mlp.gate.weight") == "F32"
    assert ckpt.read("model.layers.1.mlp.shared_expert_gate.weight").shape == (1, 64)
    # An expert is read from its own bytes only: memory for one expert's matrix, not all E.
    seen = []
    dequantize = gguf.quants.dequantize
    monkeypatch.setattr(gguf.quants, "dequantize",
                        lambda data, qtype: seen.append(data.nbytes) or dequantize(data, qtype))
    for hf_name in ckpt.hf_names():
        ckpt.read(hf_name)
    tensors = gguf.GGUFReader(path).tensors
    assert sum(seen) == sum(t.n_bytes for t in tensors)  # every byte once
    assert max(seen) < min(t.n_bytes for t in tensors if "_exps" in t.name)  # no stack whole


def test_reading_rows_of_a_large_tensor_dequantizes_only_those(files, monkeypatch):
    """The converter reads the embedding and lm_head chunk by chunk along the vocabulary:
    GGUFTensors dequantizes just a chunk's rows there, to the same values as the whole."""
    from qwen2_jax.checkpoint import gguf_io

    ckpt = GGUFCheckpoint(files["q8.gguf"][0])
    name = "model.embed_tokens.weight"
    whole = ckpt.read(name)
    np.testing.assert_array_equal(ckpt.read(name, rows=slice(3, 17)), whole[3:17])
    monkeypatch.setattr(gguf_io, "ROWS_PAST_BYTES", 0)  # every tensor counts as large
    seen = []
    dequantize = gguf.quants.dequantize
    monkeypatch.setattr(gguf.quants, "dequantize",
                        lambda data, qtype: seen.append(data.shape[0]) or dequantize(data, qtype))
    tensors = gguf_io.GGUFTensors(ckpt)
    np.testing.assert_array_equal(tensors.read(name, (slice(3, 17), slice(2, 9))),
                                  whole[3:17, 2:9])
    assert seen == [14]
    np.testing.assert_array_equal(tensors.read(name, (slice(0, whole.shape[0]), slice(2, 9))),
                                  whole[:, 2:9])  # all rows: the whole tensor, kept for the next
    np.testing.assert_array_equal(tensors.read(name, (slice(None), slice(9, 12))), whole[:, 9:12])
    assert seen == [14, whole.shape[0]]


TEXTS = [
    "Hello world", "Hello, world!", "你好", "The quick brown fox jumps over the lazy dog 1234567.",
    "人工智能正在改变世界，我们需要理解它。", "def fib(n):\n    return n if n < 2 else fib(n-1) + fib(n-2)\n",
    "emoji 👍🏽🎉 and 🇯🇵 flags", "  leading spaces\n\n\ttabs\r\nand   gaps  ",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|fim_prefix|>def f(x):<|fim_suffix|>\n    return y<|fim_middle|>",
    "<tool_call>\n{\"name\": \"f\"}\n</tool_call><|endoftext|>",
]


@pytest.fixture(scope="module")
def tokenizers_pair(files, tmp_path_factory):
    """(our tokenizer folder, transformers' GGUF tokenizer) for the real-vocabulary file."""
    from transformers import Qwen2Tokenizer
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES

    path = files["qwen25.gguf"][0]
    folder = tmp_path_factory.mktemp("gguf_tokenizer")
    for file_name, text in GGUFCheckpoint(path).tokenizer_files().items():
        (folder / file_name).write_text(text, encoding="utf-8")
    # The class AutoTokenizer picks for qwen2, called directly: AutoTokenizer would first read
    # the config with gguf-py's GGUFReader, ~30 s on this vocabulary.
    assert TOKENIZER_MAPPING_NAMES["qwen2"] == "Qwen2Tokenizer"
    return folder, Qwen2Tokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def test_tokenizer_matches_transformers(tokenizers_pair):
    folder, theirs = tokenizers_pair
    ours = Tokenizer(str(folder))
    assert ours.encode("Hello world") == [9707, 1879]
    assert ours.encode("Hello, world!") == [9707, 11, 1879, 0]
    assert ours.encode("你好") == [108386]
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs(text)["input_ids"], text
        assert ours.decode(ids) == theirs.decode(ids) == text
    # Every added token whole, with its id, special or not as transformers has it.
    added = ours._tokenizer.get_added_tokens_decoder()
    assert sorted(added) == list(range(151643, 151665))
    for token_id, token in added.items():
        assert ours.encode(token.content) == theirs(token.content)["input_ids"] == [token_id]
        assert token.special == theirs.added_tokens_decoder[token_id].special, token.content
    assert not added[151657].special and added[151659].special  # <tool_call>, <|fim_prefix|>
    assert len(ours) == 151665  # the padding tokens [PAD151665]... are left out
    for key in ("eos_token", "pad_token", "bos_token"):
        assert ours.special_token(key) == getattr(theirs, key), key
    assert ours.special_id("eos_token") == 151645
    messages = [{"role": "user", "content": "Write quicksort in Python."},
                {"role": "assistant", "content": "def qs(a): ..."}, {"role": "user", "content": "你好"}]
    text = ours.apply_chat_template(messages, add_generation_prompt=True)
    assert text == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.encode(text) == theirs(text)["input_ids"]


def test_tokenizer_normalizes_like_qwen2(tokenizers_pair, qwen2_tokenizer_dir):
    """NFC as Qwen2's own tokenizer.json (transformers' GGUF tokenizer has no normalizer)."""
    folder, _ = tokenizers_pair
    decomposed = "cafe\u0301 nai\u0308ve"
    assert Tokenizer(str(folder)).encode(decomposed) == Tokenizer(
        str(qwen2_tokenizer_dir)).encode(decomposed)


# ----- bad input ----------------------------------------------------------------------------------


def minimal_gguf(path, arch: str, tensors: dict | None = None) -> None:
    """A GGUF with only general.architecture and raw `tensors` {name: (uint8 bytes, type)}."""
    writer = gguf.GGUFWriter(str(path), arch)
    for name, (data, qtype) in (tensors or {}).items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def dense_variant(files, tmp_path, **kwargs):
    path = tmp_path / "variant.gguf"
    write_gguf(path, files["f32.gguf"][1], Q.F32, small_tokens(TINY["vocab_size"]), **kwargs)
    return path


def raises(message: str):
    """pytest.raises for a GGUFError whose text holds `message` verbatim."""
    return pytest.raises(GGUFError, match=re.escape(message))


def test_missing_truncated_bad_magic_and_version(files, tmp_path):
    with raises(f"{tmp_path}/nope.gguf: no such file"):
        GGUFCheckpoint(tmp_path / "nope.gguf")
    data = files["f32.gguf"][0].read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:len(data) // 2])
    with raises(f"{cut}: truncated GGUF file ({len(data) // 2} bytes): tensor "):
        GGUFCheckpoint(cut)
    cut.write_bytes(data[:300])
    with raises(f"{cut}: truncated or corrupt GGUF file (300 bytes): its metadata cannot be read"):
        GGUFCheckpoint(cut)
    cut.write_bytes(data[:10])
    with raises(f"{cut}: truncated GGUF file: 10 bytes, shorter than the 24-byte header"):
        GGUFCheckpoint(cut)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + data[4:])
    with raises(f"{bad}: not a GGUF file: it starts with b'GGML', expected the magic b'GGUF'"):
        GGUFCheckpoint(bad)
    bad.write_bytes(data[:4] + (1).to_bytes(4, "little") + data[8:])
    with raises(f"{bad}: GGUF version 1 is not supported; supported: 2, 3"):
        GGUFCheckpoint(bad)


def test_unsupported_architecture_and_tensor_type(tmp_path):
    path = tmp_path / "llama.gguf"
    minimal_gguf(path, "llama")
    with raises(f"{path}: general.architecture 'llama' is not supported; supported: qwen2, qwen2moe"):
        GGUFCheckpoint(path)
    _, block_bytes = gguf.GGML_QUANT_SIZES[Q.Q1_0]  # a ggml type newer than gguf-py's dequantize
    path = tmp_path / "q1.gguf"
    minimal_gguf(path, "qwen2", {"token_embd.weight": (np.zeros((4, block_bytes), np.uint8), Q.Q1_0)})
    with raises(f"{path}: tensor token_embd.weight has type Q1_0, which gguf 0.19.0 cannot "
                "dequantize; supported: F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, "
                "Q5_K, Q6_K, IQ2_XXS"):
        GGUFCheckpoint(path)


def test_missing_or_wrong_tensors_and_metadata(files, tmp_path):
    path = dense_variant(files, tmp_path, drop={"blk.1.attn_q.bias", "output_norm.weight"})
    with raises(f"{path}: missing tensors: blk.1.attn_q.bias, output_norm.weight"):
        GGUFCheckpoint(path)
    path = dense_variant(files, tmp_path, drop={"qwen2.context_length"})
    with raises(f"{path}: missing metadata key 'qwen2.context_length'"):
        GGUFCheckpoint(path)
    path = dense_variant(files, tmp_path, extra={"rope_freqs.weight": np.ones(7, np.float32)})
    with raises(f"{path}: unexpected tensors (not part of a qwen2 model with this config): "
                "rope_freqs.weight"):
        GGUFCheckpoint(path)
    path = dense_variant(files, tmp_path, head_count_kv=4)
    with raises(f"{path}: tensor blk.0.attn_k.weight (model.layers.0.self_attn.k_proj.weight) has "
                "shape (28, 56); config expects (56, 56) (num_key_value_heads=4, head_dim=14, "
                "hidden_size=56)"):
        GGUFCheckpoint(path)
    path = files["f32.gguf"][0]
    with raises(f"{path}: missing metadata key 'tokenizer.ggml.merges'"):
        GGUFCheckpoint(path).tokenizer_files()


@pytest.mark.parametrize("name", ["q8.gguf", "f16.gguf"])
def test_load_and_convert_a_gguf_file_give_transformers_logits(files, tmp_path, capsys, name):
    """qwen2_jax.load("x.gguf") and `qwen2-jax convert x.gguf OUT` then load(OUT): the logits
    of transformers' model from the same file (q8: tied embeddings; f16: YaRN). These files
    have no merges, so no tokenizer: the folder gets none, with a warning."""
    import qwen2_jax
    from qwen2_jax import cli

    path, _ = files[name]
    ids = np.random.default_rng(0).integers(0, 100, (2, 23))
    config = None
    if name == "f16.gguf":  # transformers reads no rope scaling from a qwen2 GGUF; give it ours
        from transformers import Qwen2Config as HFConfig

        config = HFConfig(**GGUFCheckpoint(path).config())
    with torch.no_grad():
        expected = transformers_model(path, config)(torch.tensor(ids)).logits.numpy()
    assert cli.main(["convert", str(path), str(tmp_path / "out"), "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["dtype"] == "float32"
    assert summary["model_files"] == []
    for source in (path, tmp_path / "out"):
        config_ours, params = qwen2_jax.load(source)
        logits = np.asarray(qwen2_jax.forward(config_ours, params, ids))
        np.testing.assert_allclose(logits, expected, atol=1e-4 * np.abs(expected).max(), rtol=0)
    # A broken file: a clear error, exit 2, nothing written.
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(path.read_bytes()[:-1000])
    assert cli.main(["convert", str(broken), str(tmp_path / "bad"), "--no-progress"]) == 2
    assert "truncated GGUF file" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_convert_writes_the_files_tokenizer_and_chat_template(files, tmp_path, capsys):
    """A folder converted from a GGUF file has its tokenizer and chat template."""
    from qwen2_jax import cli
    from qwen2_jax.tokenizer import Tokenizer

    path, _ = files["qwen25.gguf"]
    assert cli.main(["convert", str(path), str(tmp_path / "out"), "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["model_files"] == ["tokenizer.json", "tokenizer_config.json"]
    tokenizer = Tokenizer(str(tmp_path / "out"))
    assert tokenizer.encode("Hello, world!") == [9707, 11, 1879, 0]  # DESIGN.md's known ids
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi"
        "<|im_end|>\n<|im_start|>assistant\n")
