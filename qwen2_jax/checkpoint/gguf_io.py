"""A llama.cpp GGUF file of a Qwen2 model, presented as a Hugging Face model folder.

`GGUFCheckpoint(path)` memory-maps the file and gives what a Hugging Face folder holds:
`config()` (config.json), `tokenizer_files()` (tokenizer.json and tokenizer_config.json), and
every tensor by its HF name in HF layout (torch Linear [out, in]), dequantized to float32 one at
a time by `gguf.quants.dequantize`: the function transformers' GGUF loader calls, on the same
bytes, so the values are bit-identical to
`AutoModelForCausalLM.from_pretrained(dir, gguf_file=name, dtype=torch.float32)`'s.

The file's layout (header, metadata, tensor table) is read here with `struct` rather than by
gguf-py's `GGUFReader`, which makes a numpy view per vocabulary entry: Qwen2's 450k tokens,
types and merges took it 30 s to open (0.5 s here). gguf-py still does all dequantization.

Only general.architecture qwen2 and qwen2moe. llama.cpp writes qwen2's q/k projections
unpermuted (it permutes llama's), so nothing is undone here; qwen2moe stacks each layer's routed
experts into one [E, out, in] tensor per projection (`ffn_{gate,up,down}_exps`) and stores the
shared-expert gate 1-D, which `read` slices and reshapes back to HF's per-expert tensors. An
expert's rows are whole quantization blocks, so `read` dequantizes just that expert's bytes: the
same values as slicing the dequantized stack, with one expert's matrix in memory, not E.

Where transformers' loader (5.23) loses something the source model had, this keeps it:
- qwen2moe: `expert_feed_forward_length` / `expert_shared_feed_forward_length` become
  moe_intermediate_size / shared_expert_intermediate_size (transformers ignores them, takes
  Qwen1.5-MoE's 1408 / 5632 and cannot load any other size);
- `rope.scaling.*` becomes `rope_scaling` (transformers reads it for gpt-oss only);
- float32 metadata (rms_norm_eps) is written as its shortest decimal, 1e-06 rather than
  9.999999974752427e-07: the same float32;
- tokenizer.json has the NFC normalizer of Qwen2's own tokenizer.json, and leaves out llama.cpp's
  padding tokens (type UNUSED, `[PAD151665]`...), so it has 151,665 ids like the source
  tokenizer, not 151,936: generation masks the ids past the tokenizer, never samples a padding
  row. Token ids of NFC text are the same as transformers' GGUF tokenizer's.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import mmap
import os
import struct
from importlib import metadata
from typing import NamedTuple

import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors

from qwen2_jax.checkpoint.mapping import tensor_rules
from qwen2_jax.config import ConfigError, Qwen2Config
from qwen2_jax.tokenizer import QWEN2_PATTERN

try:
    import gguf
except ImportError as e:  # optional: only .gguf paths need it
    raise ImportError("reading .gguf files needs the gguf package: pip install gguf==0.19.0") from e

# general.architecture -> (HF model_type, HF architectures)
ARCHITECTURES = {"qwen2": ("qwen2", "Qwen2ForCausalLM"),
                 "qwen2moe": ("qwen2_moe", "Qwen2MoeForCausalLM")}
# tokenizer.ggml.pre values that mean Qwen2's pre-tokenizer split (transformers maps both to it)
QWEN2_PRE_TOKENIZERS = ("qwen2", "deepseek-r1-qwen")
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = (gguf.TokenType.NORMAL, gguf.TokenType.CONTROL,
                                            gguf.TokenType.USER_DEFINED, gguf.TokenType.UNUSED)

_FLOATS = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}

# HF name -> GGUF name: outside the layers, then within `model.layers.N.` / `blk.N.`
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    **{f"self_attn.{p}_proj.{k}": f"attn_{p}.{k}" for p in "qkv" for k in ("weight", "bias")},
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    **{f"mlp.{p}_proj.weight": f"ffn_{p}.weight" for p in ("gate", "up", "down")},
    "mlp.gate.weight": "ffn_gate_inp.weight",  # the router
    **{f"mlp.shared_expert.{p}_proj.weight": f"ffn_{p}_shexp.weight" for p in ("gate", "up", "down")},
    "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",  # HF [1, D], stored [D]
}
# model.layers.N.mlp.experts.J.{gate,up,down}_proj.weight is row J of blk.N.ffn_{..}_exps.weight


class GGUFError(ValueError):
    """A GGUF file this reader cannot present as a Qwen2 model: says what was found and expected."""


@functools.cache
def _can_dequantize(qtype: gguf.GGMLQuantizationType) -> bool:
    """Whether this gguf version dequantizes `qtype` (asked by dequantizing one zero block)."""
    _, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.dequantize(np.zeros((1, block_bytes), np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def _shortest(value):
    """A float32 metadata value as its shortest decimal (1e-06, not 9.999999974752427e-07);
    anything else as it is (for Qwen2Config to judge)."""
    return float(str(np.float32(value))) if isinstance(value, float) else value


def _gguf_location(hf_name: str) -> tuple[str, int | None]:
    """(GGUF tensor name, expert index or None) holding the HF tensor `hf_name`."""
    if hf_name in _GLOBAL:
        return _GLOBAL[hf_name], None
    _, _, layer, rest = hf_name.split(".", 3)  # model.layers.N.rest
    if rest.startswith("mlp.experts."):
        _, _, expert, proj, _ = rest.split(".")  # mlp.experts.J.gate_proj.weight
        return f"blk.{layer}.ffn_{proj.removesuffix('_proj')}_exps.weight", int(expert)
    return f"blk.{layer}.{_LAYER[rest]}", None


def _listing(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f" ... ({len(names)} in all)" if len(names) > limit else "")


class _Tensor(NamedTuple):
    name: str
    type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order (ggml's dims reversed): torch's [out, in]
    offset: int  # from the start of the file
    nbytes: int


# struct formats of the fixed-size metadata value types (GGUFValueType), little-endian
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}
_STRING, _ARRAY = 8, 9
SUPPORTED_VERSIONS = (2, 3)  # v1 counted in 32 bits; llama.cpp has written v3 since 2023


class _Cursor:
    """Reads GGUF values (little-endian) from `buffer` onward from `pos`."""

    def __init__(self, buffer, pos: int):
        self.buffer, self.pos = buffer, pos

    def take(self, fmt: str) -> tuple:
        values = struct.unpack_from("<" + fmt, self.buffer, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values

    def string(self) -> str:
        (length,) = self.take("Q")
        self.pos += length
        if self.pos > len(self.buffer):
            raise struct.error("a string runs past the end of the file")
        return self.buffer[self.pos - length:self.pos].decode("utf-8")

    def value(self, kind: int):
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.take("IQ")
            if item in _SCALARS:
                return list(self.take(f"{count}{_SCALARS[item]}"))
            return [self.value(item) for _ in range(count)]
        if kind not in _SCALARS:
            raise ValueError(f"unknown metadata value type {kind}")
        return self.take(_SCALARS[kind])[0]


def _read_layout(path: str) -> tuple[mmap.mmap, dict, dict[str, _Tensor]]:
    """(the file mapped read-only, its metadata, its tensors by GGUF name).

    Layout (ggml docs/gguf.md): magic, version u32, tensor count u64, metadata count u64, the
    metadata, the tensor infos (name, dims with ne0 first, type, offset), data aligned to
    general.alignment (32).
    """
    if not os.path.isfile(path):
        raise GGUFError(f"{path}: no such file")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) >= 4 and head[:4] != b"GGUF":
            raise GGUFError(f"{path}: not a GGUF file: it starts with {head[:4]!r}, expected the "
                            "magic b'GGUF'")
        if size < 24:
            raise GGUFError(f"{path}: truncated GGUF file: {size} bytes, shorter than the 24-byte "
                            "header")
        version = int.from_bytes(head[4:8], "little")
        if version & 0xFFFF == 0:  # how gguf-py spots the other byte order
            raise GGUFError(f"{path}: a big-endian GGUF file; only little-endian is supported")
        if version not in SUPPORTED_VERSIONS:
            raise GGUFError(f"{path}: GGUF version {version} is not supported; supported: "
                            f"{', '.join(map(str, SUPPORTED_VERSIONS))}")
        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    cursor = _Cursor(buffer, 8)
    try:
        tensor_count, kv_count = cursor.take("QQ")
        fields = {}
        for _ in range(kv_count):
            key = cursor.string()
            fields[key] = cursor.value(cursor.take("I")[0])
        infos = []
        for _ in range(tensor_count):
            name = cursor.string()
            dims = cursor.take(f"{cursor.take('I')[0]}Q")
            infos.append((name, dims[::-1], *cursor.take("IQ")))
    except (struct.error, UnicodeDecodeError, ValueError, MemoryError) as e:
        raise GGUFError(f"{path}: truncated or corrupt GGUF file ({size} bytes): its metadata "
                        f"cannot be read ({e})") from e
    alignment = fields.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"{path}: general.alignment is {alignment!r}; expected a power of two")
    start = -(-cursor.pos // alignment) * alignment  # the data, after padding
    tensors = {}
    for name, shape, kind, offset in infos:
        try:
            qtype = gguf.GGMLQuantizationType(kind)
        except ValueError:
            raise GGUFError(f"{path}: tensor {name} has ggml type {kind}, unknown to gguf "
                            f"{metadata.version('gguf')}") from None
        block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        if shape and shape[-1] % block:
            raise GGUFError(f"{path}: tensor {name} has rows of {shape[-1]}, not a multiple of "
                            f"the {qtype.name} block ({block})")
        tensor = _Tensor(name, qtype, shape, start + offset, math.prod(shape) // block * block_bytes)
        if tensor.offset + tensor.nbytes > size:
            raise GGUFError(f"{path}: truncated GGUF file ({size} bytes): tensor {name} ends at "
                            f"byte {tensor.offset + tensor.nbytes}")
        if name in tensors:
            raise GGUFError(f"{path}: tensor {name} appears twice")
        tensors[name] = tensor
    return buffer, fields, tensors


_REQUIRED = object()


class GGUFCheckpoint:
    """An open GGUF file of a qwen2 / qwen2moe model, checked against the config it implies.

    Raises GGUFError, before any tensor is dequantized, for a missing, truncated or non-GGUF
    file, an unsupported GGUF version, architecture or tensor type, a missing metadata key, and
    a missing, unexpected or misshapen tensor.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._buffer, self._fields, self._tensors = _read_layout(self.path)
        self.architecture = self._value("general.architecture")
        if self.architecture not in ARCHITECTURES:
            raise self._error(f"general.architecture {self.architecture!r} is not supported; "
                              f"supported: {', '.join(ARCHITECTURES)}")
        for t in self._tensors.values():
            if not _can_dequantize(t.type):
                supported = [q.name for q in gguf.GGMLQuantizationType if _can_dequantize(q)]
                raise self._error(
                    f"tensor {t.name} has type {t.type.name}, which gguf "
                    f"{metadata.version('gguf')} cannot dequantize; supported: {', '.join(supported)}")
        self._config = self._read_config()
        try:
            rules = tensor_rules(Qwen2Config.from_hf(self._config))
        except (ConfigError, TypeError) as e:
            raise self._error(f"its metadata gives an invalid config: {e}") from e
        self._shapes = {r.hf_name: r.hf_shape for r in rules}  # in HF order
        self._check(rules)

    def _error(self, message: str) -> GGUFError:
        return GGUFError(f"{self.path}: {message}")

    def _value(self, key: str, default=_REQUIRED):
        if key not in self._fields:
            if default is _REQUIRED:
                raise self._error(f"missing metadata key {key!r}")
            return default
        return self._fields[key]

    def _tensor(self, name: str):
        if name not in self._tensors:
            raise self._error(f"missing tensor {name}")
        return self._tensors[name]

    def _read_config(self) -> dict:
        arch = self.architecture

        def key(name: str, default=_REQUIRED):
            return self._value(f"{arch}.{name}", default)

        model_type, architecture = ARCHITECTURES[arch]
        heads = key("attention.head_count")
        config = {
            "architectures": [architecture],
            "model_type": model_type,
            # the embedding's rows, to which llama.cpp also pads the token list
            "vocab_size": self._tensor("token_embd.weight").shape[0],
            "hidden_size": key("embedding_length"),
            "intermediate_size": key("feed_forward_length"),
            "num_hidden_layers": key("block_count"),
            "num_attention_heads": heads,
            "num_key_value_heads": key("attention.head_count_kv", heads),  # llama.cpp's default
            "max_position_embeddings": key("context_length"),
            "rope_theta": _shortest(key("rope.freq_base", 10000.0)),  # llama.cpp's default
            "rms_norm_eps": _shortest(key("attention.layer_norm_rms_epsilon")),
            "hidden_act": "silu",
            # llama.cpp writes the output projection only when it is not the embedding
            "tie_word_embeddings": "output.weight" not in self._tensors,
            "bos_token_id": self._value("tokenizer.ggml.bos_token_id", None),
            "eos_token_id": self._value("tokenizer.ggml.eos_token_id", None),
            "pad_token_id": self._value("tokenizer.ggml.padding_token_id", None),
            "torch_dtype": "float32",
        }
        scaling = key("rope.scaling.type", "none")
        if scaling != "none":
            config["rope_scaling"] = {"rope_type": scaling}
            if (factor := key("rope.scaling.factor", None)) is not None:
                config["rope_scaling"]["factor"] = _shortest(factor)
            if (original := key("rope.scaling.original_context_length", None)) is not None:
                config["rope_scaling"]["original_max_position_embeddings"] = original
        if arch == "qwen2moe":  # llama.cpp's qwen2moe: every layer sparse, top-k not renormalized
            config.update(num_experts=key("expert_count"), num_experts_per_tok=key("expert_used_count"),
                          moe_intermediate_size=key("expert_feed_forward_length"),
                          shared_expert_intermediate_size=key("expert_shared_feed_forward_length"),
                          norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[])
        return config

    def _check(self, rules) -> None:
        """Every tensor the config implies is there, in its HF shape, and nothing else is."""
        expected = {_gguf_location(r.hf_name)[0] for r in rules}
        missing = sorted(expected - set(self._tensors))
        if missing:
            raise self._error(f"missing tensors: {_listing(missing)}")
        unexpected = sorted(set(self._tensors) - expected)
        if unexpected:
            raise self._error(f"unexpected tensors (not part of a {self.architecture} model with "
                              f"this config): {_listing(unexpected)}")
        for r in rules:
            name, expert = _gguf_location(r.hf_name)
            shape = self._tensors[name].shape
            if expert is not None:  # [E, out, in]
                shape, experts = shape[1:], shape[0]
                if experts != self._config["num_experts"]:
                    raise self._error(f"tensor {name} has {experts} experts; config expects "
                                      f"num_experts={self._config['num_experts']}")
            if shape != r.hf_shape and (1, *shape) != r.hf_shape:  # the 1-D shared-expert gate
                raise self._error(f"tensor {name} ({r.hf_name}) has shape {shape}; config expects "
                                  f"{r.hf_shape} ({r.dims})")

    def config(self) -> dict:
        """The HF config.json dict (model_type qwen2 or qwen2_moe)."""
        return copy.deepcopy(self._config)

    def hf_names(self) -> list[str]:
        """Every HF tensor name of the model, in HF order (no lm_head.weight when tied)."""
        return list(self._shapes)

    def shape(self, hf_name: str) -> tuple[int, ...]:
        """The HF tensor's shape (torch layout)."""
        return self._shapes[hf_name]

    def dtype(self, hf_name: str) -> str:
        """The GGUF type name of the tensor holding `hf_name` ("Q8_0", "F32", ...)."""
        return self._tensors[self._location(hf_name)[0]].type.name

    def _location(self, hf_name: str) -> tuple[str, int | None]:
        if hf_name not in self._shapes:
            raise KeyError(f"{self.path}: no tensor {hf_name!r} in this model")
        return _gguf_location(hf_name)

    def read(self, hf_name: str, rows: slice | None = None) -> np.ndarray:
        """The HF tensor `hf_name` as float32 in HF layout (e.g. q_proj.weight [N*H, D]), or
        only its `rows` (of a 2-D tensor: each row is whole quantization blocks, so those rows'
        bytes alone are dequantized, to the same values).

        F32 tensors come back as read-only views of the file: copy what you keep. Nothing is
        cached: each call dequantizes the tensor's bytes (one expert's, for an expert).
        """
        if rows is not None:
            shape = self._shapes[hf_name]
            start, stop, _ = rows.indices(shape[0])
            name, expert = self._location(hf_name)
            data = self._bytes(self._tensors[name], expert)[start:stop]
            values = gguf.quants.dequantize(data, self._tensors[name].type)
            return np.asarray(values, np.float32).reshape(stop - start, *shape[1:])
        name, expert = self._location(hf_name)
        t = self._tensors[name]
        values = gguf.quants.dequantize(self._bytes(t, expert), t.type)
        return np.asarray(values, np.float32).reshape(self._shapes[hf_name])  # [D] -> [1, D]

    def _bytes(self, t: _Tensor, expert: int | None) -> np.ndarray:
        """The tensor's data as gguf-py's GGUFReader views it for `dequantize` (one expert's
        for an expert): floats as they are, quantized types as [..., rows, bytes per row]."""
        if t.type in _FLOATS:
            dtype, shape = _FLOATS[t.type], t.shape
        else:
            dtype, shape = np.uint8, gguf.quants.quant_shape_to_byte_shape(t.shape, t.type)
        data = np.frombuffer(self._buffer, dtype, math.prod(shape), t.offset).reshape(shape)
        return data if expert is None else data[expert]  # [E, out, ...] -> [out, ...]

    def has_tokenizer(self) -> bool:
        """Whether the file carries a vocabulary (weights-only files exist)."""
        return all(f"tokenizer.ggml.{k}" in self._fields for k in ("tokens", "merges"))

    def tokenizer_files(self) -> dict[str, str]:
        """{"tokenizer.json": ..., "tokenizer_config.json": ...} as text, from the file's
        byte-level BPE vocabulary (tokenizer.ggml.tokens / merges / token_type).

        Control tokens (type 3) become special added tokens and user-defined ones (4) plain added
        tokens, as transformers' GGUF tokenizer has them (Qwen2.5: `<|fim_prefix|>` ... special,
        `<tool_call>` not).
        """
        model = self._value("tokenizer.ggml.model")
        if model != "gpt2":
            raise self._error(f"tokenizer.ggml.model {model!r} is not supported; expected 'gpt2' "
                              "(Qwen2's byte-level BPE)")
        pre = self._value("tokenizer.ggml.pre", "qwen2")  # old files lack it
        if pre not in QWEN2_PRE_TOKENIZERS:
            raise self._error(f"tokenizer.ggml.pre {pre!r} is not supported; supported: "
                              f"{', '.join(QWEN2_PRE_TOKENIZERS)}")
        tokens = self._value("tokenizer.ggml.tokens")
        types = self._value("tokenizer.ggml.token_type", [_NORMAL] * len(tokens))
        merges = self._value("tokenizer.ggml.merges")
        vocab = {t: i for i, (t, kind) in enumerate(zip(tokens, types, strict=True))
                 if kind != _UNUSED}
        tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(
            vocab, [tuple(m.split(" ")) for m in merges], fuse_unk=False, byte_fallback=False,
            ignore_merges=False))
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
        added = {kind: [AddedToken(t, special=kind == _CONTROL, normalized=False)
                        for t, k in zip(tokens, types, strict=True) if k == kind]
                 for kind in (_CONTROL, _USER_DEFINED)}
        tokenizer.add_special_tokens(added[_CONTROL])  # in the vocabulary: they keep their ids
        tokenizer.add_tokens(added[_USER_DEFINED])

        def token(key: str) -> str | None:
            index = self._value(f"tokenizer.ggml.{key}", None)
            return None if index is None else tokens[index]

        config = {
            "tokenizer_class": "Qwen2Tokenizer",
            "bos_token": token("bos_token_id"),
            "eos_token": token("eos_token_id"),
            "pad_token": token("padding_token_id"),
            "unk_token": token("unknown_token_id"),
            "add_bos_token": self._value("tokenizer.ggml.add_bos_token", False),
            "add_eos_token": self._value("tokenizer.ggml.add_eos_token", False),
            "model_max_length": self._config["max_position_embeddings"],
            "errors": "replace",
            "clean_up_tokenization_spaces": False,
        }
        if (template := self._value("tokenizer.chat_template", None)) is not None:
            config["chat_template"] = template
        return {"tokenizer.json": tokenizer.to_str(),
                "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False)}



ROWS_PAST_BYTES = 64 << 20  # float32 tensors larger than this are read row block by row block


class GGUFTensors:
    """A GGUF file's tensors behind SafetensorsFile's reading interface (HF names, float32,
    HF layout), so that HFCheckpoint loads and converts a GGUF file exactly as it does
    safetensors. Keeps the last tensor it dequantized: a converter reads a tensor chunk by
    chunk, and dequantizing it once per chunk would repeat the work many times over."""

    def __init__(self, checkpoint: GGUFCheckpoint):
        self.path = checkpoint.path
        self._checkpoint = checkpoint
        self.tensors = {name: (np.dtype(np.float32), checkpoint.shape(name), 0)
                        for name in checkpoint.hf_names()}
        self._last: tuple[str | None, np.ndarray | None] = (None, None)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name][1]

    def read(self, name: str, index: tuple[slice, ...] = ()) -> np.ndarray:
        shape = self.tensors[name][1]
        if len(shape) == 2 and index and len(range(*index[0].indices(shape[0]))) < shape[0] \
                and math.prod(shape) * 4 > ROWS_PAST_BYTES:
            # a large tensor read by rows (the embedding, lm_head: chunks split the vocabulary):
            # dequantizing only those rows keeps memory at a chunk, not the whole tensor
            return self._checkpoint.read(name, rows=index[0])[(slice(None), *index[1:])]
        if self._last[0] != name:
            self._last = (None, None)  # the previous tensor's memory goes first
            self._last = (name, self._checkpoint.read(name))
        return self._last[1][index]
