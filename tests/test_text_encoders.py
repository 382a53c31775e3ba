"""Step-1 and HunyuanCLIP text encoders, their tokenizers and the caption encoder."""
import json
import math
import os

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from stepvideo_ms.models import step_tokenizer as st
from stepvideo_ms.models.caption import CaptionEncoder, check_prompts, round_to_bf16
from stepvideo_ms.models.hunyuan_clip import CLIP_MAX_LENGTH, BertModel, HunyuanClip, load_bert
from stepvideo_ms.models.step_llm import MultiQueryAttention, Step1Model, alibi_slopes, alibi_sqrt_bias, ffn_width
from stepvideo_ms.formats.safetensors_io import save_file_atomic
from stepvideo_ms.tools.tokenizer_build import train_step1_sentencepiece, write_bert_vocab
from stepvideo_ms.tools.verification import load_all_kinds
from stepvideo_ms.tools.verify import check_case

CORPUS = [
    "A cat walks on the moon.",
    "An astronaut finds a glowing stone tablet on the moon.",
    "The camera pans slowly over the city at night.",
    "一名宇航员在月球上发现一块石碑，上面印有字样，闪闪发光",
    "小猫在草地上奔跑，阳光明媚",
    "A red car drives along the coast at sunset.",
]
BERT_WORDS = ["a", "cat", "walks", "on", "the", "moon", ".", "astronaut", "city", "月", "球", "石", "碑", "猫"]
STEP_CFG = {"hidden_size": 64, "num_attention_heads": 4, "num_attention_groups": 2, "ffn_hidden_size": 100,
            "num_layers": 1, "layernorm_epsilon": 1e-5, "padded_vocab_size": 128, "seq_length": 320}
BERT_CFG = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
            "vocab_size": 32, "max_position_embeddings": 80, "type_vocab_size": 2, "hidden_act": "gelu",
            "layer_norm_eps": 1e-12, "model_type": "bert"}


# ---- golden data --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["step_llm", "clip"])
def test_golden_case_passes(golden_dir, name):
    load_all_kinds()
    ok, err, tol, detail = check_case(name, os.path.join(golden_dir, f"{name}_weights.safetensors"),
                                      os.path.join(golden_dir, f"{name}_io.safetensors"))
    assert ok, f"{name}: {detail} (tolerance {tol:.3e})"
    assert err < 1e-5


# ---- ALiBi and attention ------------------------------------------------------------------------
def reference_slopes(n):
    """The slopes of the ALiBi paper's reference code, written out independently."""
    def power_of_two(n):
        start = 2 ** (-2 ** -(math.log2(n) - 3))
        return [start * start ** i for i in range(n)]
    if math.log2(n).is_integer():
        return power_of_two(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_two(closest) + reference_slopes(2 * closest)[0::2][: n - closest]


@pytest.mark.parametrize("heads", [2, 3, 6, 48])
def test_alibi_slopes_standard(heads):
    np.testing.assert_allclose(alibi_slopes(heads), reference_slopes(heads), rtol=1e-12)


def test_alibi_slopes_known_values():
    np.testing.assert_allclose(alibi_slopes(2), [2 ** -4, 2 ** -8])
    np.testing.assert_allclose(alibi_slopes(3), [2 ** -4, 2 ** -8, 2 ** -2])


def test_alibi_bias_is_minus_slope_sqrt_distance():
    bias = alibi_sqrt_bias(3, 5)
    slopes = alibi_slopes(3)
    assert bias.shape == (3, 5, 5) and bias.dtype == np.float32
    assert bias[1, 4, 0] == pytest.approx(-slopes[1] * 2.0)
    assert bias[2, 3, 1] == pytest.approx(-slopes[2] * math.sqrt(2))
    assert np.all(np.diagonal(bias, axis1=1, axis2=2) == 0)
    assert np.all(bias[:, 0, 1:] == 0)


def test_ffn_width_rounds_up_to_256():
    assert [ffn_width(n) for n in (1, 256, 300, 513)] == [256, 256, 512, 768]


def _softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def test_grouped_query_attention_matches_numpy_reference():
    """4 query heads on 2 key/value groups: heads 0,1 read group 0 and heads 2,3 group 1; the fused
    projection holds all queries, then (key, value) per group."""
    rng = np.random.default_rng(0)
    b, s, dim, h, g = 2, 5, 32, 4, 2
    d = dim // h
    att = MultiQueryAttention(dim, h, g)
    wqkv = rng.standard_normal((dim + 2 * g * d, dim)).astype(np.float32) * 0.2
    wo = rng.standard_normal((dim, dim)).astype(np.float32) * 0.2
    att.wqkv.weight.set_data(Tensor(wqkv))
    att.wo.weight.set_data(Tensor(wo))
    x = rng.standard_normal((b, s, dim)).astype(np.float32)
    out = att(Tensor(x), Tensor(alibi_sqrt_bias(h, s)).expand_dims(0)).asnumpy()

    qkv = x @ wqkv.T
    q = qkv[..., :dim].reshape(b, s, h, d)
    kv = qkv[..., dim:].reshape(b, s, g, 2 * d)
    k, v = kv[..., :d], kv[..., d:]
    k, v = np.repeat(k, h // g, axis=2), np.repeat(v, h // g, axis=2)
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d) + alibi_sqrt_bias(h, s)[None]
    scores = np.where(np.triu(np.ones((s, s), bool), 1)[None, None], -np.inf, scores)
    ref = np.einsum("bhqk,bkhd->bqhd", _softmax(scores), v).reshape(b, s, dim) @ wo.T
    np.testing.assert_allclose(out, ref, atol=1e-5)


def _random_step1(seed=0):
    model = Step1Model.from_config(STEP_CFG)
    rng = np.random.default_rng(seed)
    for _, p in model.parameters_and_names():
        p.set_data(Tensor(rng.standard_normal(p.shape).astype(np.float32) * 0.1))
    return model


def test_step1_is_causal_and_ignores_the_mask():
    model = _random_step1()
    ids = np.array([[1, 5, 9, 13, 2, 2], [1, 5, 9, 13, 40, 2]], dtype=np.int64)
    full = model(Tensor(ids), Tensor(np.ones_like(ids))).asnumpy()
    masked = model(Tensor(ids), Tensor((ids != 2).astype(np.int64))).asnumpy()
    assert full.shape == (2, 6, 64)
    np.testing.assert_array_equal(full, masked)
    np.testing.assert_allclose(full[0, :4], full[1, :4], atol=1e-6)  # later tokens never reach earlier ones
    assert np.abs(full[0, 4] - full[1, 4]).max() > 1e-3


def test_step1_config_missing_key_is_named():
    cfg = {k: v for k, v in STEP_CFG.items() if k != "num_attention_groups"}
    with pytest.raises(ValueError, match="num_attention_groups"):
        Step1Model.from_config(cfg)


# ---- the Step-1 tokenizer -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def step_tok_path(tmp_path_factory):
    return train_step1_sentencepiece(str(tmp_path_factory.mktemp("sp") / st.STEP_TOKENIZER_FILE), CORPUS, 96)


def test_trained_tokenizer_has_step_ids(step_tok_path):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=step_tok_path)
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, st.BOS_ID, st.EOS_ID)
    for token in st.STEP_CONTROL_TOKENS + st.STEP_MASK_TOKENS:
        assert sp.is_control(sp.piece_to_id(token)), token


def test_step_tokenizer_wraps_pads_and_masks(step_tok_path):
    tok = st.StepTokenizer(step_tok_path)
    prompts = ["A cat walks on the moon.", "小猫"]
    batch = tok(prompts, max_length=40)
    assert batch.input_ids.shape == (2, 40) and batch.input_ids.dtype == np.int64
    for i, p in enumerate(prompts):
        pieces = tok.tokenize(p)
        n = len(pieces) + 2
        assert list(batch.input_ids[i, :n]) == [st.BOS_ID] + pieces + [st.EOS_ID]
        assert np.all(batch.input_ids[i, n:] == st.PAD_ID)
        assert list(batch.attention_mask[i]) == [1] * n + [0] * (40 - n)
    assert tok.detokenize(tok.tokenize("A cat walks on the moon.")) == "A cat walks on the moon."


def test_step_tokenizer_truncates_leaving_room_for_bos_eos(step_tok_path):
    tok = st.StepTokenizer(step_tok_path)
    long = " ".join(CORPUS * 4)
    pieces = tok.tokenize(long)
    assert len(pieces) > 20
    batch = tok([long], max_length=20)
    assert list(batch.input_ids[0]) == [st.BOS_ID] + pieces[:18] + [st.EOS_ID]
    assert batch.attention_mask.sum() == 20


def test_step_tokenizer_empty_list_gives_one_bos_eos_row(step_tok_path):
    batch = st.StepTokenizer(step_tok_path)([], max_length=8)
    assert batch.input_ids.tolist() == [[1, 2, 2, 2, 2, 2, 2, 2]]
    assert batch.attention_mask.tolist() == [[1, 1, 0, 0, 0, 0, 0, 0]]
    empty_prompt = st.StepTokenizer(step_tok_path)([""], max_length=4)
    assert empty_prompt.input_ids.tolist() == [[1, 2, 2, 2]] and empty_prompt.attention_mask.tolist() == [[1, 1, 0, 0]]


def test_step_tokenizer_rejects_bad_input(step_tok_path, tmp_path):
    tok = st.StepTokenizer(step_tok_path)
    with pytest.raises(TypeError, match=r"\[prompt\]"):
        tok("a cat")
    with pytest.raises(ValueError, match="max_length"):
        tok(["a"], max_length=1)
    with pytest.raises(FileNotFoundError, match=st.STEP_TOKENIZER_FILE):
        st.StepTokenizer(str(tmp_path / "nothing.model"))


def test_sentencepiece_training_checks_vocab_size(tmp_path):
    with pytest.raises(ValueError, match="at least"):
        train_step1_sentencepiece(str(tmp_path / "x.model"), CORPUS, 30)
    with pytest.raises(ValueError, match="corpus_lines"):
        train_step1_sentencepiece(str(tmp_path / "x.model"), ["", "  "], 100)


def test_step_tokenizer_requires_special_tokens(tmp_path):
    import io
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=100,
                                   hard_vocab_limit=False, minloglevel=2)
    path = tmp_path / "plain.model"
    path.write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="BOT"):
        st.StepTokenizer(str(path))


# ---- HunyuanCLIP --------------------------------------------------------------------------------
def _random_state(model, seed):
    rng = np.random.default_rng(seed)
    return {n: (rng.standard_normal(p.shape) * 0.1).astype(np.float32) for n, p in model.parameters_and_names()}


def write_tiny_model_dir(root, sp_vocab=96):
    """step_llm/ and hunyuan_clip/ in the released layout, with random weights."""
    llm = root / "step_llm"
    train_step1_sentencepiece(str(llm / st.STEP_TOKENIZER_FILE), CORPUS, sp_vocab)
    (llm / "config.json").write_text(json.dumps(STEP_CFG))
    save_file_atomic(_random_state(Step1Model.from_config(STEP_CFG), 1), str(llm / "model.safetensors"))
    clip = root / "hunyuan_clip"
    write_bert_vocab(str(clip / "tokenizer"), BERT_WORDS)
    enc = clip / "clip_text_encoder"
    enc.mkdir(parents=True)
    (enc / "config.json").write_text(json.dumps(BERT_CFG))
    save_file_atomic(_random_state(BertModel.from_config(BERT_CFG), 2), str(enc / "model.safetensors"))
    return root


def test_clip_tokenizer_pads_and_truncates_to_77(tmp_path):
    clip_dir = write_tiny_model_dir(tmp_path) / "hunyuan_clip"
    clip = HunyuanClip.from_pretrained(str(clip_dir), progress=False)
    ids, mask = clip.tokenize(["A cat walks on the moon 月球", "the " * 200])
    assert ids.shape == mask.shape == (2, CLIP_MAX_LENGTH)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + BERT_WORDS
    first = [vocab[i] for i in ids[0][mask[0] == 1]]
    assert first == ["[CLS]", "a", "cat", "walks", "on", "the", "moon", "月", "球", "[SEP]"]
    assert np.all(ids[0][mask[0] == 0] == 0)
    assert mask[1].sum() == CLIP_MAX_LENGTH and ids[1, -1] == vocab.index("[SEP]")
    hidden, pooled = clip(["a cat", "the moon"])
    assert hidden.shape == (2, CLIP_MAX_LENGTH, 32) and pooled.shape == (2, 32)


def test_clip_loader_skips_position_ids_buffer_and_missing_pooler(tmp_path):
    model = BertModel.from_config(BERT_CFG)
    state = {k: v for k, v in _random_state(model, 3).items() if not k.startswith("pooler.")}
    state["embeddings.position_ids"] = np.arange(80, dtype=np.int64)[None]
    (tmp_path / "config.json").write_text(json.dumps(BERT_CFG))
    save_file_atomic(state, str(tmp_path / "model.safetensors"))
    loaded = load_bert(str(tmp_path), progress=False)
    hidden, pooled = loaded(Tensor(np.array([[2, 5, 6, 3]])), Tensor(np.ones((1, 4), np.int64)))
    assert pooled is None and hidden.shape == (1, 4, 32)


def test_bert_rejects_unknown_activation():
    with pytest.raises(ValueError, match="hidden_act"):
        BertModel.from_config({**BERT_CFG, "hidden_act": "swish"})


# ---- the caption encoder ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_model_dir(tmp_path_factory.mktemp("model"))


def test_caption_encode_shapes_and_mask(tiny_dir):
    enc = CaptionEncoder.from_model_dir(str(tiny_dir), progress=False)
    assert enc.caption_channels == [64, 32]
    prompts = ["A cat walks on the moon.", "一名宇航员在月球上", ""]
    out = enc.encode(prompts)
    assert set(out) == {"y", "y_mask", "clip_embedding"}
    assert out["y"].shape == (3, 320, 64) and out["y"].dtype == np.float32
    assert out["clip_embedding"].shape == (3, 77, 32) and out["clip_embedding"].dtype == np.float32
    assert out["y_mask"].shape == (3, 77 + 320) and out["y_mask"].dtype == np.int64
    tokens = enc.llm.tokenizer(prompts)
    assert np.all(out["y_mask"][:, :77] == 1)
    np.testing.assert_array_equal(out["y_mask"][:, 77:], tokens.attention_mask)
    assert out["y_mask"][2, 77:].sum() == 2  # an empty prompt is BOS + EOS
    for key in ("y", "clip_embedding"):  # served as bfloat16
        np.testing.assert_array_equal(out[key], round_to_bf16(out[key]))
        assert np.all(np.isfinite(out[key]))
    single = enc.encode(prompts[:1])
    np.testing.assert_allclose(single["y"][0], out["y"][0], atol=1e-2)


def test_caption_prompt_validation():
    with pytest.raises(TypeError, match=r"\[prompt\]"):
        check_prompts("a cat")
    with pytest.raises(ValueError, match="at least one prompt"):
        check_prompts([])
    with pytest.raises(TypeError, match=r"prompts\[1\]"):
        check_prompts(["a", 3])
    assert check_prompts(("a", "")) == ["a", ""]


def test_caption_missing_files_are_named(tmp_path, tiny_dir):
    with pytest.raises(FileNotFoundError, match="step_llm"):
        CaptionEncoder.from_model_dir(str(tmp_path), progress=False)
    import shutil

    shutil.copytree(tiny_dir, tmp_path / "m")
    enc = tmp_path / "m" / "hunyuan_clip" / "clip_text_encoder"
    os.replace(enc / "model.safetensors", enc / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="convert.py"):
        CaptionEncoder.from_model_dir(str(tmp_path / "m"), progress=False)


def test_caption_rejects_bf16_on_cpu(tiny_dir):
    with pytest.raises(ValueError, match="float32"):
        CaptionEncoder.from_model_dir(str(tiny_dir), dtype=ms.bfloat16, progress=False)
