"""Small tokenizers built locally, in the released formats, for tests and tiny model directories.

- `train_step1_sentencepiece`: a sentencepiece model shaped like `step1_chat_tokenizer.model`
  (unk 0, BOS 1, EOS 2 as upstream's wrapper expects; the Step chat special tokens as control
  symbols), trained on a few lines of text.
- `write_bert_vocab`: a BertTokenizer folder (`vocab.txt` with [PAD] at id 0, then [UNK], [CLS],
  [SEP], [MASK], then the given words).

Neither is a usable language tokenizer; they exercise the same code paths as the real files.
"""
from __future__ import annotations

import io
import json
import os
from typing import Iterable, List, Sequence

from ..formats.atomic import write_bytes
from ..models.step_tokenizer import BOS_ID, EOS_ID, STEP_CONTROL_TOKENS, STEP_MASK_TOKENS

BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
MIN_STEP_VOCAB = 16


def train_step1_sentencepiece(out_path: str, corpus_lines: Sequence[str], vocab_size: int) -> str:
    """Train a small sentencepiece model on `corpus_lines` and write it to `out_path`; returns out_path.

    `vocab_size` is an upper bound (a small corpus may give fewer pieces); it includes the 3
    reserved ids (unk, BOS, EOS) and the 8 Step special tokens.
    """
    import sentencepiece as spm

    lines: List[str] = [ln.strip() for ln in corpus_lines if ln and ln.strip()]
    if not lines:
        raise ValueError("corpus_lines is empty: give a few lines of text to train the tokenizer on")
    specials = STEP_CONTROL_TOKENS + STEP_MASK_TOKENS
    chars = {c for ln in lines for c in ln if not c.isspace()}
    needed = max(MIN_STEP_VOCAB, len(chars) + 3 + len(specials) + 1)  # every character, ids 0-2, specials, the space
    if int(vocab_size) < needed:
        raise ValueError(f"vocab_size={vocab_size} is too small for this corpus ({len(chars)} distinct characters): "
                         f"use at least {needed}")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="unigram",
        vocab_size=int(vocab_size),
        hard_vocab_limit=False,
        character_coverage=1.0,
        unk_id=0, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1,
        control_symbols=list(specials),
        minloglevel=2,
        num_threads=1,
    )
    write_bytes(out_path, model.getvalue())
    return out_path


def write_bert_vocab(folder: str, words: Iterable[str]) -> str:
    """Write `folder/vocab.txt` (BERT's special tokens, then `words` in order, duplicates dropped) and a
    tokenizer_config.json for BertTokenizer; returns the folder."""
    vocab: List[str] = list(BERT_SPECIAL_TOKENS)
    seen = set(vocab)
    for word in words:
        if not isinstance(word, str) or not word or any(c.isspace() for c in word):
            raise ValueError(f"vocabulary entry {word!r} must be a non-empty string without whitespace")
        if word not in seen:
            seen.add(word)
            vocab.append(word)
    os.makedirs(folder, exist_ok=True)
    write_bytes(os.path.join(folder, "vocab.txt"), ("\n".join(vocab) + "\n").encode("utf-8"))
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "tokenize_chinese_chars": True,
              "pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
              "mask_token": "[MASK]"}
    write_bytes(os.path.join(folder, "tokenizer_config.json"), json.dumps(config, indent=2).encode("utf-8"))
    return folder
