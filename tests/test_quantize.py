"""Weight-only int8/int4 quantization and the int8 KV cache: error bounds and the packed
layout on random matrices; a quantized model computing exactly what its dequantized float
params compute (both CPU paths of `quantize.quantized_dot`), in forward, generate, Orbax round
trips and on a mesh; the int8 cache's error; the load arguments' errors."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qwen2_jax
from conftest import make_hf_model
from qwen2_jax import quantize as quant
from qwen2_jax.checkpoint.to_orbax import write_orbax, write_quantized
from qwen2_jax.decoding import decode_step, generate, init_cache, prefill
from qwen2_jax.sharding import make_mesh

EPS = 1e-6  # float32 rounding of w / scale and of q * scale, relative to the scale
# absmax / 127 (or / 7) as XLA computes it: maybe times the rounded reciprocal, an ulp off.
SCALE_RTOL = 3e-7


def rel_err(got, want) -> float:
    """The largest difference, relative to the largest |want|."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(1e-12, np.abs(want).max()))


def channel_scaled(rng, shape, axis=-1) -> np.ndarray:
    """Normal values with one log-normal magnitude per index along `axis`, so the per-channel
    scales really differ (a single global scale would pass a per-channel check by luck)."""
    mags = np.exp(rng.normal(size=shape[axis]) * 1.5)
    mags = np.expand_dims(mags, tuple(i for i in range(len(shape)) if i != axis % len(shape)))
    return (rng.normal(size=shape) * mags).astype(np.float32)


# One compiled program per function and shape: called eagerly, each op would compile alone.
quantize_int8 = jax.jit(quant.quantize_int8, static_argnums=1)
quantize_int4 = jax.jit(quant.quantize_int4, static_argnums=1)
quantize_param = jax.jit(quant.quantize_param, static_argnums=(0, 2, 3))
dequantize = jax.jit(quant.dequantize, static_argnums=(2, 3))
unpack_int4 = jax.jit(quant.unpack_int4)
quantize_kv = jax.jit(quant.quantize_kv)
dequantize_params = jax.jit(quant.dequantize_params)
O_PROJ = ("self_attn", "o_proj", "kernel")


# -- error bounds and layout on random matrices ---------------------------------------------


def test_int8_per_output_channel_scale_and_error_bound(rng):
    w = channel_scaled(rng, (300, 37))
    w[:, 5] = 0  # an all-zero channel: scale 0, no division by zero
    q, scale = quantize_int8(w, (0,))
    assert q.dtype == np.int8 and q.shape == w.shape
    assert scale.dtype == np.float32 and scale.shape == (37,)
    deq = np.asarray(dequantize(q, scale, 0))
    q, scale = np.asarray(q), np.asarray(scale)
    np.testing.assert_allclose(scale, np.abs(w).max(0) / np.float32(127), rtol=SCALE_RTOL)
    err = np.abs(w - deq)
    assert (err <= scale * (0.5 + EPS)).all(), (err / np.maximum(scale, 1e-30)).max()
    live = np.arange(37) != 5
    assert (np.abs(q).max(0)[live] == 127).all()  # each channel's absmax maps to +-127
    assert (q[:, 5] == 0).all() and (deq[:, 5] == 0).all() and scale[5] == 0
    # One scale per channel, not one for the matrix: the small channels keep their resolution.
    assert scale[live].max() / scale[live].min() > 10


def test_int8_over_two_input_dims_like_o_proj(rng):
    """o_proj [N, H, D]: one scale per output channel D over both input dims N and H."""
    w = channel_scaled(rng, (4, 64, 40))
    out = quantize_param(O_PROJ, w, 0, "int8")
    assert out["qkernel"].shape == (4, 64, 40) and out["qscale"].shape == (40,)
    scale = np.asarray(out["qscale"])
    np.testing.assert_allclose(scale, np.abs(w).max((0, 1)) / np.float32(127), rtol=SCALE_RTOL)
    deq = np.asarray(dequantize(out["qkernel"], out["qscale"], 1))
    assert (np.abs(w - deq) <= scale * (0.5 + EPS)).all()


def int4_reference_scale(w: np.ndarray, axis: int, size: int) -> np.ndarray:
    """absmax / 7 per group of `size` along `axis`: [..., I/size, ...]."""
    moved = np.moveaxis(w, axis, -1)
    groups = moved.reshape(*moved.shape[:-1], -1, size)
    return np.moveaxis(np.abs(groups).max(-1) / np.float32(7), -1, axis)


@pytest.mark.parametrize("shape, axis", [((384, 24), 0), ((13, 256), 1)])
def test_int4_group_scale_and_error_bound(rng, shape, axis):
    """Groups of 128 along the input `axis` (axis 1: an embedding table [V, D])."""
    w = channel_scaled(rng, shape, axis=1 - axis)
    index = [slice(None)] * 2
    index[axis] = slice(128, 256)
    w[tuple(index)] *= 50  # one group far larger than the others
    q, scale = quantize_int4(w, axis)
    packed_shape, groups_shape = list(shape), list(shape)
    packed_shape[axis] //= 2
    groups_shape[axis] //= 128
    assert q.dtype == np.uint8 and list(q.shape) == packed_shape
    assert scale.dtype == np.float32 and list(scale.shape) == groups_shape
    deq = np.asarray(dequantize(q, scale, axis))
    scale = np.asarray(scale)
    np.testing.assert_allclose(scale, int4_reference_scale(w, axis, 128), rtol=SCALE_RTOL)
    per_value = np.repeat(scale, 128, axis=axis)
    err = np.abs(w - deq)
    assert (err <= per_value * (0.5 + EPS)).all(), (err / per_value).max()
    # The other groups were not quantized with the big group's scale.
    small = np.delete(np.moveaxis(err, axis, 0), slice(128, 256), axis=0)
    assert small.max() < np.abs(w).max() / 7 / 2 / 10


def test_int4_packing_is_the_documented_layout_and_round_trips():
    """Every value in [-7, 7] in both nibbles: w is k * 0.5 with each group holding +-7, so
    scale is 0.5 exactly and q is k exactly; byte j of a group holds value j in its low
    nibble and value j + 64 in its high one."""
    inputs, outputs = 256, 5
    k = (np.arange(inputs)[:, None] + 3 * np.arange(outputs)[None, :]) % 15 - 7  # [I, O]
    groups = k.reshape(2, 2, 64, outputs)  # [group, half, j, O]
    assert all(set(groups[g, h, :, o]) == set(range(-7, 8))
               for g in range(2) for h in range(2) for o in range(outputs))
    w = (k * 0.5).astype(np.float32)
    packed, scale = quantize_int4(w, 0)
    np.testing.assert_array_equal(np.asarray(scale), np.full((2, outputs), 0.5, np.float32))
    expected = ((groups[:, 0] & 0xF) | ((groups[:, 1] & 0xF) << 4)).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(packed), expected.reshape(128, outputs))
    low, high = (np.asarray(x) for x in unpack_int4(packed))
    np.testing.assert_array_equal(low.reshape(2, 64, outputs), groups[:, 0])
    np.testing.assert_array_equal(high.reshape(2, 64, outputs), groups[:, 1])
    np.testing.assert_array_equal(np.asarray(dequantize(packed, scale, 0)), w)
    # Every byte: both nibbles sign-extend (two's complement), -8 included.
    every = np.arange(256, dtype=np.uint8)
    low, high = (np.asarray(x) for x in unpack_int4(every))
    np.testing.assert_array_equal(low, ((every & 0xF).astype(np.int16) ^ 8) - 8)
    np.testing.assert_array_equal(high, ((every >> 4).astype(np.int16) ^ 8) - 8)


@pytest.mark.parametrize("lead", [0, 1])
def test_int4_o_proj_head_of_64_groups_by_head(rng, lead):
    """o_proj [(L,) N, H, D] with H = 64 < GROUP: one group per head (size 64) along H; with
    lead 1 stacked over layers, as load quantizes it."""
    assert quant.group_size(64) == 64 and quant.group_size(896) == 128
    assert quant.group_size(14) == 2
    with pytest.raises(ValueError, match="even input dimension"):
        quant.group_size(101)
    shape = (2, 4, 64, 40)[1 - lead:]
    w = channel_scaled(rng, shape, axis=-1)
    out = quantize_param(O_PROJ, w, lead, "int4")
    assert out["qkernel"].shape == (*shape[:lead], 4, 32, 40)
    assert out["qkernel"].dtype == np.uint8
    assert out["qscale"].shape == (*shape[:lead], 4, 1, 40)
    deq = np.asarray(dequantize(out["qkernel"], out["qscale"], lead + 1))
    scale = np.asarray(out["qscale"])
    np.testing.assert_allclose(scale, np.abs(w).max(lead + 1, keepdims=True) / np.float32(7),
                               rtol=SCALE_RTOL)
    assert (np.abs(w - deq) <= scale * (0.5 + EPS)).all()
    # The abstract tree (what Orbax restores into) has the same shapes.
    axes = ("layers", "heads", "head_dim", "embed")[1 - lead:]
    boxed = {"o_proj": {"kernel": nn.Partitioned(jax.ShapeDtypeStruct(shape, jnp.float32),
                                                 axes)}}
    abstract = quant.quantize_abstract(boxed, "int4", False)["o_proj"]
    assert abstract["qkernel"].value.shape == out["qkernel"].shape
    assert abstract["qscale"].value.shape == out["qscale"].shape


def test_kv_int8_per_token_and_head_error_bound(rng):
    x = channel_scaled(rng, (2, 3, 9, 16), axis=2)  # [B, K, S, H], token magnitudes differ
    q, scale = quantize_kv(x)
    assert q.dtype == np.int8 and scale.shape == (2, 3, 9)
    deq = np.asarray(jax.jit(quant.dequantize_kv, static_argnums=2)(q, scale, jnp.float32))
    q, scale = np.asarray(q), np.asarray(scale)
    np.testing.assert_allclose(scale, np.abs(x).max(-1) / np.float32(127), rtol=SCALE_RTOL)
    assert (np.abs(x - deq) <= scale[..., None] * (0.5 + EPS)).all()
    assert (np.abs(q).max(-1) == 127).all()


# -- the matmuls: both CPU paths equal x @ dequantize(q) -------------------------------------


@pytest.fixture
def blocked_calls(monkeypatch):
    """Counts `_blocked_dot` calls while tracing (a new jit traces every time)."""
    calls = []
    original = quant._blocked_dot
    monkeypatch.setattr(quant, "_blocked_dot",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("name, shape, n_in", [("q_proj", (56, 4, 14), 1),
                                               ("o_proj", (4, 64, 40), 2),
                                               ("down_proj", (384, 24), 1)])
def test_quantized_dot_both_paths_equal_dequantized_dot(rng, blocked_calls, mode, name, shape,
                                                        n_in):
    assert jax.default_backend() == "cpu"
    w = channel_scaled(rng, shape, axis=-1)
    out = quantize_param(("self_attn", name, "kernel"), w, 0, mode)
    deq = np.asarray(dequantize(out["qkernel"], out["qscale"], n_in - 1), np.float64)
    for lead, blocked in [((1, 3), True), ((2, 40), False)]:  # 3 rows: the loop; 80: whole
        x = rng.normal(size=lead + shape[:n_in]).astype(np.float32)
        before = len(blocked_calls)
        y = jax.jit(lambda x, q, s: quant.quantized_dot(x, q, s, n_in, jnp.float32,
                                                        jax.lax.Precision.HIGHEST))(
            x, out["qkernel"], out["qscale"])
        assert (len(blocked_calls) > before) == blocked
        want = np.tensordot(x.astype(np.float64), deq, n_in)
        assert y.shape == want.shape
        assert rel_err(y, want) < 1e-5, (lead, rel_err(y, want))


def largest_float_buffer(hlo: str) -> int:
    """The element count of the largest f32 array anywhere in an optimized HLO module."""
    import re

    return max(int(np.prod([int(d) for d in dims.split(",") if d]) or 1)
               for dims in re.findall(r"f32\[([\d,]*)\]", hlo))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_decoding_never_materializes_the_float_weight(mode):
    """On CPU, the one-row product reads the int weight and dequantizes it a tile at a time:
    no float32 array of the weight's size exists in the compiled program (the whole-weight
    form, taken for many rows, does make one; the check sees it)."""
    rows_in, cols = 896, 4864  # Qwen2-0.5B's gate_proj
    w = jnp.zeros((rows_in, cols), jnp.float32)
    out = quantize_param(("mlp", "gate_proj", "kernel"), w, 0, mode)

    def compiled(rows):
        x = jax.ShapeDtypeStruct((rows, rows_in), jnp.float32)
        return jax.jit(lambda x, q, s: quant.quantized_dot(x, q, s, 1, jnp.float32)).lower(
            x, out["qkernel"], out["qscale"]).compile().as_text()

    assert largest_float_buffer(compiled(1)) < rows_in * cols // 8
    assert largest_float_buffer(compiled(128)) >= rows_in * cols


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("vocab", [256, 101])  # 256: blocks of 128 rows; 101: no block fits
def test_quantized_table_attend_and_lookup(rng, mode, vocab):
    table = channel_scaled(rng, (vocab, 56), axis=0)
    out = quantize_param(("embed_tokens", "embedding"), table, 0, mode)
    q, scale = out["qembedding"], out["qscale"]
    assert scale.shape == ((vocab,) if mode == "int8" else (vocab, 7))  # int4: groups of 8
    deq = np.asarray(dequantize(q, scale, 1), np.float64)
    row_max = np.abs(table).max(1, keepdims=True)
    assert (np.abs(table - deq) <= row_max * (0.5 + EPS) / (127 if mode == "int8" else 7)).all()
    attend = jax.jit(lambda x, q, s: quant.quantized_attend(x, q, s, jnp.float32,
                                                            jax.lax.Precision.HIGHEST))
    for rows in ((1, 3), (2, 40)):
        x = rng.normal(size=(*rows, 56)).astype(np.float32)
        y = attend(x, q, scale)
        assert y.dtype == jnp.float32 and y.shape == (*rows, vocab)
        assert rel_err(y, x.astype(np.float64) @ deq.T) < 1e-5
    ids = rng.integers(0, vocab, (2, 7))
    lookup = jax.jit(lambda q, s, ids: quant.quantized_lookup(q, s, ids, jnp.float32))
    np.testing.assert_array_equal(np.asarray(lookup(q, scale, ids)), deq.astype(np.float32)[ids])


# -- whole models -----------------------------------------------------------------------------

# untied: vocab 128, so the few-rows lm_head loop (`quantized_attend`, blocks of 128) runs;
# tied: vocab 101, which no block of >= 8 divides, so its lm_head dequantizes whole.
MODELS = {"untied": dict(vocab_size=128), "tied": dict(tie_word_embeddings=True, seed=1)}
# (mode, model, quantize_embeddings): every pair of the three choices, in four loads.
VARIANTS = [("int8", "untied", False), ("int4", "untied", True), ("int8", "tied", True),
            ("int4", "tied", False)]
# One prompt set and length for every generate, so the tests share compiled programs.
PROMPTS = [np.random.default_rng(2).integers(0, 101, n).tolist() for n in (5, 12, 1, 8)]
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for name, overrides in MODELS.items():
        out[name] = tmp_path_factory.mktemp(name)
        make_hf_model(out[name], **overrides)
    return out


@pytest.fixture(scope="module")
def loaded(folders):
    """load(folder, quantize=..., quantize_embeddings=...), each once per module."""
    cache = {}

    def get(model, mode=None, embeddings=False):
        key = (model, mode, embeddings)
        if key not in cache:
            cache[key] = qwen2_jax.load(folders[model], quantize=mode,
                                        quantize_embeddings=embeddings)
        return cache[key]

    return get


def assert_trees_identical(got: dict, want: dict) -> None:
    """Same paths, dtypes, shapes and bits."""
    got_leaves = jax.tree_util.tree_leaves_with_path(got)
    want_leaves = jax.tree_util.tree_leaves_with_path(want)
    assert [p for p, _ in got_leaves] == [p for p, _ in want_leaves]
    for (path, a), (_, b) in zip(got_leaves, want_leaves, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))


def per_element_scales(params: dict) -> dict:
    """The scale each dequantized weight element was multiplied by (quantized values all 1:
    int8 1, int4 bytes 0x11), in the tree of `dequantize_params`."""
    def ones(path, x):
        if path[-1].key in ("qkernel", "qembedding"):
            return jnp.full_like(x, 1 if x.dtype == jnp.int8 else 0x11)
        return x

    return dequantize_params(jax.tree_util.tree_map_with_path(ones, params))


@pytest.mark.parametrize("mode, model, embeddings", VARIANTS)
def test_quantized_forward_equals_dequantized_float_forward(loaded, mode, model, embeddings):
    config, params = loaded(model, mode, embeddings)
    _, floats = loaded(model)
    assert quant.quantization_of(params) == {"weights": mode, "embeddings": embeddings}
    assert quant.quantization_of(floats) is None
    attn = params["layers"]["self_attn"]
    assert attn["q_proj"]["qkernel"].dtype == (np.int8 if mode == "int8" else np.uint8)
    assert "kernel" not in attn["q_proj"] and "kernel" not in attn["o_proj"]
    table = params["embed_tokens"]
    assert ("qembedding" in table) == embeddings and ("embedding" in table) != embeddings
    assert ("lm_head" in params) == (model == "untied")

    # The dequantized weights are the float ones within half a step, where load put each
    # scale (stacked layers, o_proj's two input dims); the rest is the float params exactly.
    dequantized = dequantize_params(params)
    scales = per_element_scales(params)
    assert jax.tree.structure(dequantized) == jax.tree.structure(floats)
    quantized = 0
    for (path, got), want, scale in zip(jax.tree_util.tree_leaves_with_path(dequantized),
                                        jax.tree.leaves(floats), jax.tree.leaves(scales),
                                        strict=True):
        got, want, scale = np.asarray(got), np.asarray(want), np.asarray(scale)
        if not np.array_equal(got, want):
            quantized += 1
            assert (np.abs(got - want) <= scale * (0.5 + EPS)).all(), path
    projections = 7 + int(embeddings) * (1 + (model == "untied"))  # q k v o gate up down
    assert quantized == projections

    rng = np.random.default_rng(1)
    errors = []
    # [1, 7]: 7 rows, the few-rows CPU loop; [2, 40]: 80 > CPU_MAX_ROWS, dequantize then dot.
    for shape in ((1, 7), (2, 40)):
        assert (np.prod(shape) <= quant.CPU_MAX_ROWS) == (shape[0] == 1)
        ids = rng.integers(0, config.vocab_size, shape)
        want = np.asarray(qwen2_jax.forward(config, dequantized, ids))
        got = np.asarray(qwen2_jax.forward(config, params, ids))
        assert rel_err(got, want) < 1e-5, (shape, rel_err(got, want))
        exact = np.asarray(qwen2_jax.forward(config, floats, ids))
        errors += list(np.abs(want - exact).max(-1).ravel() / np.abs(exact).max())
    # Against the float model, per position: not equal (it was quantized), and close for
    # int8. These tiny random models amplify any weight noise through their 3 layers: int8
    # measured 1-7% of max |logit| (median 3%), as much as the same errors shuffled to other
    # elements give, so it is the model's sensitivity, not a flaw. int4 in groups of 2 to 8
    # (these dims) is coarser: only bounded.
    assert min(errors) > 1e-3, errors
    assert np.median(errors) < (0.05 if mode == "int8" else 0.6), errors
    assert max(errors) < (0.15 if mode == "int8" else 1.0), errors


def test_quantized_generate_equals_dequantized_generate(loaded):
    """Greedy tokens of int4 params (embeddings too) equal those of their dequantized float
    params: the same logits up to float rounding (1e-5 of max |logit|, the forward test), so
    only a near-exact tie could flip a token; there is none in these prompts, so the tokens
    are compared as they are."""
    config, params = loaded("untied", "int4", True)
    want = generate(config, dequantize_params(params), PROMPTS, max_new_tokens=NEW_TOKENS)
    assert generate(config, params, PROMPTS, max_new_tokens=NEW_TOKENS) == want
    _, floats = loaded("untied")  # and int4 does change something
    assert generate(config, floats, PROMPTS, max_new_tokens=NEW_TOKENS) != want


@pytest.fixture(scope="module")
def float_orbax(folders, tmp_path_factory):
    out = {}
    for model, folder in folders.items():
        out[model] = tmp_path_factory.mktemp("float_orbax") / model
        write_orbax(str(folder), str(out[model]), progress=False)
    return out


@pytest.mark.parametrize("mode, model", [("int8", "tied"), ("int4", "untied")])
def test_quantized_orbax_round_trip_is_bit_exact(tmp_path, folders, loaded, float_orbax, mode,
                                                 model):
    """write_quantized then load gives load(hf, quantize=)'s arrays; a float Orbax folder
    quantized at load gives them too; a quantized folder refuses another quantization."""
    _, want = loaded(model, mode, True)
    out = tmp_path / "quantized"
    summary = write_quantized(str(folders[model]), str(out), mode, quantize_embeddings=True)
    assert summary["quantize"] == mode and summary["bytes"] == quant.weight_bytes(want)
    _, got = qwen2_jax.load(out)
    assert_trees_identical(got, want)
    _, got = qwen2_jax.load(float_orbax[model], quantize=mode, quantize_embeddings=True)
    assert_trees_identical(got, want)

    other = "int4" if mode == "int8" else "int8"
    with pytest.raises(ValueError, match=rf"quantized as \{{'weights': '{mode}', 'embeddings': "
                                         rf"True\}}; it cannot be loaded as \{{'weights': "
                                         rf"'{other}'"):
        qwen2_jax.load(out, quantize=other)


def test_quantized_folder_without_embeddings_refuses_them(tmp_path, folders, loaded):
    out = tmp_path / "quantized"
    write_quantized(str(folders["tied"]), str(out), "int4")
    _, params = qwen2_jax.load(out, quantize="int4")  # naming what it holds is fine
    assert_trees_identical(params, loaded("tied", "int4", False)[1])
    with pytest.raises(ValueError, match=r"quantized as \{'weights': 'int4', 'embeddings': "
                                         r"False\}; it cannot be loaded as \{'weights': "
                                         r"'int4', 'embeddings': True\}"):
        qwen2_jax.load(out, quantize="int4", quantize_embeddings=True)


@pytest.mark.parametrize("mode, model, embeddings", [VARIANTS[0], VARIANTS[1]])
def test_quantized_on_a_mesh_equals_one_device(folders, loaded, mode, model, embeddings):
    config, params = loaded(model, mode, embeddings)
    mesh = make_mesh("fsdp=2,tensor=4")
    _, sharded = qwen2_jax.load(folders[model], quantize=mode, quantize_embeddings=embeddings,
                                mesh=mesh)
    qkernel = sharded["layers"]["self_attn"]["q_proj"]["qkernel"]  # [L, D or D/2, N, H]
    assert qkernel.sharding.mesh == mesh and qkernel.sharding.spec[1:3] == ("fsdp", "tensor")
    assert not qkernel.sharding.is_fully_replicated
    assert qkernel.addressable_shards[0].data.shape == (3, qkernel.shape[1] // 2, 1, 14)
    down = sharded["layers"]["mlp"]["down_proj"]["qkernel"]  # [L, F or F/2, D]: 56 on fsdp
    assert down.addressable_shards[0].data.shape[2] == 28
    assert_trees_identical(sharded, params)  # the same values, only placed

    # [2, 40]: the one-device program of the forward test, reused.
    ids = np.random.default_rng(3).integers(0, config.vocab_size, (2, 40))
    want = np.asarray(qwen2_jax.forward(config, params, ids))
    logits = qwen2_jax.forward(config, sharded, ids)
    assert logits.sharding.mesh == mesh
    assert rel_err(logits, want) < 1e-5

    if embeddings:  # one generate on the mesh, with the int8 KV cache
        want = generate(config, params, PROMPTS, max_new_tokens=NEW_TOKENS, kv_cache_dtype="int8")
        assert generate(config, sharded, PROMPTS, max_new_tokens=NEW_TOKENS,
                        kv_cache_dtype="int8") == want


# -- the int8 KV cache ------------------------------------------------------------------------


def test_int8_kv_cache_logits_close_to_float_cache(loaded):
    """One model (the int4 one the generate tests use, to share their programs), two caches:
    prefill and decode_step with an int8 cache against a float32 one, fed the same tokens,
    give logits within 3% of max |logit|, and not equal ones (the cache really is int8).
    generate with kv_cache_dtype="int8" starts from that int8 prefill."""
    config, params = loaded("untied", "int4", True)
    lengths = jnp.asarray([len(p) for p in PROMPTS], jnp.int32)
    ids = np.zeros((4, 16), np.int32)
    for row, prompt in enumerate(PROMPTS):
        ids[row, :len(prompt)] = prompt
    caches = {kind: init_cache(config, 4, 32, jnp.float32, kv_cache_dtype=kind)
              for kind in ("auto", "int8")}
    assert caches["auto"]["k"].dtype == jnp.float32 and set(caches["auto"]) == {"k", "v"}
    assert caches["int8"]["k"].dtype == caches["int8"]["v"].dtype == jnp.int8
    assert caches["int8"]["k_scale"].shape == caches["int8"]["v_scale"].shape == (3, 4, 2, 32)
    logits = {}
    for kind in caches:
        logits[kind], caches[kind] = prefill(config, jnp.float32, None, (), params,
                                             caches[kind], ids, lengths)
    first_int8 = np.asarray(jnp.argmax(logits["int8"], -1)).tolist()
    errors = []
    for _ in range(NEW_TOKENS):
        errors.append(rel_err(logits["int8"], logits["auto"]))
        token = jnp.argmax(logits["auto"], -1).astype(jnp.int32)  # both fed the same tokens
        for kind in caches:
            logits[kind], caches[kind] = decode_step(config, jnp.float32, None, (), params,
                                                     caches[kind], lengths, token)
        lengths = lengths + 1
    # Measured 1-2.2%: keys and values within half a step of 1/127 of their absmax each,
    # amplified by the tiny random model as weight noise is (the forward test).
    assert min(errors) > 1e-4 and max(errors) < 0.05, errors
    tokens = generate(config, params, PROMPTS, max_new_tokens=NEW_TOKENS, kv_cache_dtype="int8")
    assert [row[0] for row in tokens] == first_int8
    floats = generate(config, params, PROMPTS, max_new_tokens=NEW_TOKENS)
    agree = np.mean(np.array(tokens) == np.array(floats))
    assert agree >= 0.5, (agree, tokens, floats)


# -- bad arguments ----------------------------------------------------------------------------


def test_bad_quantize_arguments(folders):
    with pytest.raises(ValueError, match=r"quantize 'int5' is not one of \('int8', 'int4'\)"):
        qwen2_jax.load(folders["tied"], quantize="int5")
    with pytest.raises(ValueError, match="quantize_embeddings needs quantize='int8' or 'int4'"):
        qwen2_jax.load(folders["tied"], quantize_embeddings=True)
    config = qwen2_jax.PRESETS["Qwen2-0.5B"]
    with pytest.raises(ValueError, match=r"kv_cache_dtype 'int4' is not one of \('auto', 'int8'\)"):
        generate(config, {}, [[1]], kv_cache_dtype="int4")
