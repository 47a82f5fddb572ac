"""Tests of vdit.text: byte tokenizer, text transformer and the TextEncoder interface."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from vdit import text
from vdit.text import (BOS, EOS, PAD, ByteTokenizer, PromptTruncatedWarning, TextEncoder, TransformerTextEncoder,
                       WordTokenizer)

L = 32
PROMPTS = ["a red circle moving left", "ein Würfel 🎲 bewegt sich", "", "é"]


@pytest.fixture(scope="module")
def enc():
    return TransformerTextEncoder(max_length=L, width=32, depth=2, num_heads=4)


@pytest.fixture(scope="module")
def params(enc):
    return jax.jit(enc.init)(jax.random.key(0))


# ----------------------------------------------------------------------------- tokenizer


def test_round_trip_ascii_and_non_ascii():
    tok = ByteTokenizer(max_length=64)
    ids, mask = tok(PROMPTS)
    assert ids.shape == mask.shape == (len(PROMPTS), 64)
    assert ids.dtype == np.int32 and mask.dtype == bool
    assert tok.decode(ids) == PROMPTS
    assert tok.decode(ids[1]) == PROMPTS[1]
    assert ids.max() < tok.vocab_size
    # BOS, bytes, EOS, then padding; the mask covers exactly BOS..EOS.
    n = len(PROMPTS[1].encode("utf-8"))
    assert ids[1, 0] == BOS and ids[1, n + 1] == EOS and (ids[1, n + 2 :] == PAD).all()
    np.testing.assert_array_equal(mask.sum(1), [len(p.encode("utf-8")) + 2 for p in PROMPTS])


def test_single_string_is_batch_of_one():
    ids, mask = ByteTokenizer(8)("hi")
    assert ids.shape == mask.shape == (1, 8)


def test_empty_prompt_is_bos_eos():
    ids, mask = ByteTokenizer(8)("")
    np.testing.assert_array_equal(ids[0], [BOS, EOS] + [PAD] * 6)
    np.testing.assert_array_equal(mask[0], [True, True] + [False] * 6)


def test_truncation_warns_with_dropped_tail_on_utf8_boundary():
    tok = ByteTokenizer(max_length=8)  # room for 6 bytes
    # "€" is 3 bytes at offsets 5..7: a byte cut would split it, so it goes whole.
    with pytest.warns(PromptTruncatedWarning, match='truncated to 8 tokens; dropped 2 chars: "€x"'):
        ids, mask = tok("abcde€x")
    assert tok.decode(ids[0]) == "abcde"
    assert mask.sum() == 7 and ids[0, 6] == EOS


def test_no_warning_when_prompt_fits():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ByteTokenizer(max_length=8)(["abcdef", ""])  # exactly 6 bytes fit


def test_decode_tolerates_invalid_bytes():
    bad = np.array([BOS, 0xC3 + text.BYTE_OFFSET, EOS, 70], np.int32)  # lone lead byte
    assert ByteTokenizer(8).decode(bad) == "\ufffd"


@pytest.mark.parametrize(
    "prompts, match",
    [
        (b"bytes", "str or a list/tuple of str, got bytes"),
        (None, "got NoneType"),
        (np.array(["a"]), "got ndarray"),
        (["ok", 3], r"prompts\[1\] is int"),
    ],
)
def test_bad_prompts_raise_one_line_type_error(prompts, match):
    with pytest.raises(TypeError, match=match) as e:
        ByteTokenizer(8)(prompts)
    assert "\n" not in str(e.value)


def test_bad_config_raises():
    with pytest.raises(ValueError, match="max_length"):
        ByteTokenizer(2)
    with pytest.raises(ValueError, match="divide"):
        TransformerTextEncoder(width=30, num_heads=4)
    with pytest.raises(ValueError, match="attn_impl"):
        TransformerTextEncoder(attn_impl="flash")
    with pytest.raises(ValueError, match="vocab_size"):
        TransformerTextEncoder(vocab_size=100)


def test_token_ids_outside_the_vocabulary_are_named():
    model = text.TextTransformer(vocab_size=300, max_length=8, width=16, depth=1, num_heads=2)
    ids, mask = jnp.full((1, 8), 5, jnp.int32), jnp.ones((1, 8), bool)
    params = model.init(jax.random.key(0), ids, mask)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, vocab_size=300\), got ids from 5 to 300"):
        model.apply(params, ids.at[0, 3].set(300), mask)
    assert np.isfinite(np.asarray(jax.jit(model.apply)(params, ids, mask))).all()

    # Under jit: a padded slot's id is never read; a real id out of range (negative ones too,
    # which a gather would wrap to a valid row) gives NaN rather than a plausible embedding.
    jitted = jax.jit(model.apply)
    padded = mask.at[0, 6:].set(False)
    ref = np.asarray(jitted(params, ids, padded))
    np.testing.assert_array_equal(np.asarray(jitted(params, ids.at[0, 7].set(300), padded)), ref)
    for bad in (300, -5):
        out = np.asarray(jitted(params, ids.at[0, 3].set(bad), padded))
        assert np.isnan(out[0, 3]).all(), bad


def test_word_tokenizer_one_id_per_word_case_and_punctuation():
    tok = WordTokenizer(max_length=10, vocab_size=4096)
    ids, mask = tok(["a red circle moving left", "A  Red, circle!", ""])
    assert ids.shape == mask.shape == (3, 10) and ids.dtype == np.int32
    a, red, circle = (tok.word_id(w) for w in ("a", "red", "circle"))
    np.testing.assert_array_equal(ids[0, :7], [BOS, a, red, circle, tok.word_id("moving"), tok.word_id("left"), EOS])
    # Case and spacing do not matter; punctuation marks are pieces of their own.
    np.testing.assert_array_equal(ids[1, :7], [BOS, a, red, tok.word_id(","), circle, tok.word_id("!"), EOS])
    np.testing.assert_array_equal(ids[2], [BOS, EOS] + [PAD] * 8)  # the unconditional prompt, as with bytes
    np.testing.assert_array_equal(mask.sum(1), [7, 7, 2])
    assert ids.min() >= 0 and ids.max() < tok.vocab_size and (ids[mask][1:-1] >= text.BYTE_OFFSET).any()


def test_word_tokenizer_moving_shapes_vocabulary_has_no_collisions():
    from vdit.data import moving_shapes as ms

    words = ["a", "moving", *ms.COLORS, *ms.SHAPES, *ms.DIRECTIONS]
    assert WordTokenizer(40).colliding(words) == {}
    # colliding() does find shared ids: with 5 buckets, 15 words must share some.
    assert WordTokenizer(40, vocab_size=text.BYTE_OFFSET + 5).colliding(words)


def test_word_tokenizer_truncates_whole_words_with_warning():
    tok = WordTokenizer(max_length=5)  # room for 3 words
    with pytest.warns(PromptTruncatedWarning, match='truncated to 5 tokens; dropped 2 words: "moving left"'):
        ids, mask = tok("a red circle moving left")
    assert ids[0, 4] == EOS and mask.all()


def test_word_tokenizer_bad_arguments():
    with pytest.raises(ValueError, match="max_length"):
        WordTokenizer(2)
    with pytest.raises(ValueError, match="vocab_size must be an int > 4"):
        WordTokenizer(8, vocab_size=4)
    with pytest.raises(TypeError, match="got bytes"):
        WordTokenizer(8)(b"red")
    with pytest.raises(ValueError, match="unknown tokenizer 'wordpiece'; expected 'bytes' or 'words'"):
        TransformerTextEncoder(tokenizer="wordpiece")


def test_word_encoder_embeds_every_word_distinctly():
    enc = TransformerTextEncoder(max_length=L, width=32, depth=1, num_heads=4, tokenizer="words", vocab_size=512)
    assert isinstance(enc, TextEncoder) and isinstance(enc.tokenizer, WordTokenizer)
    p = enc.init(jax.random.key(0))
    assert nn.unbox(p)["token_embed"]["embedding"].shape == (512, 32)
    emb, mask = enc.encode(p, ["a red circle moving left", "a red square moving left"])
    assert emb.shape == (2, L, 32) and int(mask.sum()) == 14
    # Same-length words differ by one token each, and that token's embedding moves.
    assert float(jnp.abs(emb[0, 3] - emb[1, 3]).max()) > 1e-3
    with pytest.raises(TypeError, match="WordTokenizer ids are hashed and do not decode"):
        enc.decode(enc.tokenize("a red circle")[0])


# ----------------------------------------------------------------------------- model


def test_encode_shapes_dtype_and_zero_padding(enc, params):
    assert isinstance(enc, TextEncoder)
    emb, mask = enc.encode(params, PROMPTS)
    assert emb.shape == (len(PROMPTS), L, enc.width) and emb.dtype == jnp.float32
    assert mask.shape == (len(PROMPTS), L) and mask.dtype == jnp.bool_
    assert mask.any(axis=1).all()  # the empty prompt too
    assert bool(jnp.isfinite(emb).all())
    assert bool((emb[~mask] == 0).all())
    assert bool((jnp.abs(emb[mask]).sum(-1) > 0).all())


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_mask_matters(impl, params):
    enc = TransformerTextEncoder(max_length=L, width=32, depth=2, num_heads=4, attn_impl=impl)
    apply = jax.jit(enc.apply)
    ids, mask = enc.tokenize(["a red circle", "x"])
    base = apply(params, ids, mask)

    # A different id at a padded position changes nothing at valid positions.
    ids_pad = ids.copy()
    ids_pad[:, -1] = 100
    out = apply(params, ids_pad, mask)
    np.testing.assert_array_equal(out[mask], base[mask])
    assert bool((out[~mask] == 0).all())

    # A different valid token changes the embeddings of the other valid tokens.
    ids_tok = ids.copy()
    ids_tok[0, 2] += 1
    out = apply(params, ids_tok, mask)
    assert float(jnp.abs(out[0, 5] - base[0, 5]).max()) > 1e-4
    np.testing.assert_array_equal(out[1], base[1])  # other prompts are independent


def test_params_carry_logical_axes(enc, params):
    boxed = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert boxed and all(isinstance(b, nn.Partitioned) for b in boxed)
    specs = nn.get_partition_spec(params)
    assert specs["token_embed"]["embedding"] == P("vocab", "embed")
    assert specs["pos_embed"] == P(None, "embed")
    assert specs["block_0"]["attn"]["q"]["linear"]["kernel"] == P("embed", "heads")
    assert specs["block_0"]["mlp"]["fc1"]["linear"]["kernel"] == P("embed", "mlp")
    # Abstract init (eval_shape) gives the same tree without allocating.
    abstract = jax.eval_shape(enc.init, jax.random.key(0))
    assert nn.get_partition_spec(abstract) == specs


def test_param_count_formula(enc, params):
    d, h, v = enc.width, int(enc.width * 4.0), text.VOCAB_SIZE
    block = 4 * (d * d + d) + (d * h + h) + (h * d + d) + 2 * d
    expected = v * d + L * d + 2 * block + d
    assert sum(x.size for x in jax.tree.leaves(nn.unbox(params))) == expected


def test_jit_traces_once(enc, params):
    traces = []

    def fn(p, ids, mask):
        traces.append(1)
        return enc.apply(p, ids, mask)

    jfn = jax.jit(fn)
    ids, mask = enc.tokenize(["one", "two"])
    ids2, mask2 = enc.tokenize(["three", "a longer fourth prompt"])  # same padded shape
    np.testing.assert_allclose(jfn(params, ids, mask), enc.apply(params, ids, mask), atol=1e-5)
    jfn(params, ids2, mask2)
    assert len(traces) == 1


def test_bf16_compute_with_f32_params(params):
    enc16 = TransformerTextEncoder(max_length=L, width=32, depth=2, num_heads=4, dtype=jnp.bfloat16)
    p16 = jax.eval_shape(enc16.init, jax.random.key(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nn.unbox(p16)))
    emb16, mask = enc16.encode(params, PROMPTS)
    emb32, _ = TransformerTextEncoder(max_length=L, width=32, depth=2, num_heads=4).encode(params, PROMPTS)
    assert emb16.dtype == jnp.bfloat16
    assert bool((emb16[~mask] == 0).all())
    # Final RMSNorm makes outputs O(1); bf16 keeps ~3 significant digits.
    np.testing.assert_allclose(np.asarray(emb16, np.float32), emb32, atol=0.1)


def test_gradients_flow_and_ignore_padding(enc, params):
    ids, mask = enc.tokenize(["a blue square moving up", "b"])

    def loss(p):
        return jnp.sum(enc.apply(p, ids, mask) ** 2)

    grads = nn.unbox(jax.jit(jax.grad(loss))(params))
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    table = grads["token_embed"]["embedding"]
    assert float(jnp.abs(table[BOS]).max()) > 0
    # Padding feeds only masked keys and zeroed outputs, so PAD's row learns nothing.
    assert float(jnp.abs(table[PAD]).max()) == 0


def test_sequence_longer_than_table_raises(enc, params):
    ids = jnp.zeros((1, L + 1), jnp.int32)
    with pytest.raises(ValueError, match="exceeds max_length"):
        enc.apply(params, ids, jnp.ones(ids.shape, bool))


def test_runs_sharded_on_a_mesh(enc, params):
    n = len(jax.devices())
    mesh = jax.make_mesh((n,), ("data",), axis_types=(AxisType.Auto,))
    rules = [("act_batch", "data"), ("act_seq", None), ("act_embed", None)]
    ids, mask = enc.tokenize([f"prompt {i}" for i in range(n)])
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        batch = NamedSharding(mesh, P("data"))
        ids_s, mask_s = jax.device_put(ids, batch), jax.device_put(mask, batch)
        out = jax.jit(enc.apply)(params, ids_s, mask_s)
    assert out.sharding.spec[0] == "data"
    np.testing.assert_allclose(out, enc.apply(params, ids, mask), atol=1e-5)
