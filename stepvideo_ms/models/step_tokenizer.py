"""The Step-1 chat tokenizer: sentencepiece over `step1_chat_tokenizer.model`, with upstream's batching.

Upstream semantics, kept exactly:
- every prompt becomes [BOS] + pieces + [EOS], the pieces cut to `max_length - 2` first;
- rows are right-padded with PAD to `max_length`; the mask is 1 on BOS..EOS, 0 on the padding;
- BOS, EOS and PAD are the fixed ids 1, 2 and 2 (PAD equals EOS), whatever the model file says;
- an empty list of prompts gives ONE row, [BOS, EOS] + padding (not an empty batch);
- the model file must hold the Step chat special tokens (the first six as control symbols).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Sequence

import numpy as np

STEP_TOKENIZER_FILE = "step1_chat_tokenizer.model"
STEP_MAX_LENGTH = 320
BOS_ID = 1
EOS_ID = 2
PAD_ID = 2
# Tokens the model file must hold as control (special) symbols: turn, call and think markers.
STEP_CONTROL_TOKENS = (
    "<|BOT|>", "<|EOT|>", "<|CALL_START|>", "<|CALL_END|>", "<|THINK_START|>", "<|THINK_END|>",
)
# Tokens the model file must hold (any kind): the mask markers.
STEP_MASK_TOKENS = ("<|MASK_1e69f|>", "<|UNMASK_1e69f|>")


@dataclass
class TokenBatch:
    input_ids: np.ndarray       # (b, max_length) int64
    attention_mask: np.ndarray  # (b, max_length) int64, 1 on BOS..EOS


class StepTokenizer:
    """Step-1 tokenizer: `tok(prompts, max_length)` -> TokenBatch."""

    def __init__(self, model_file: str):
        import sentencepiece

        if not os.path.isfile(model_file):
            raise FileNotFoundError(
                f"Step-1 tokenizer model {model_file} not found: the step_llm folder needs {STEP_TOKENIZER_FILE}")
        self.model_file = model_file
        self._sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
        self._check_special_tokens()

    def _check_special_tokens(self):
        sp = self._sp
        for token in STEP_CONTROL_TOKENS + STEP_MASK_TOKENS:
            idx = sp.piece_to_id(token)
            if idx == sp.unk_id() and token != sp.id_to_piece(idx):
                raise ValueError(f"{self.model_file}: token {token!r} is missing; a Step-1 chat tokenizer holds "
                                 f"{', '.join(STEP_CONTROL_TOKENS + STEP_MASK_TOKENS)}")
            if token in STEP_CONTROL_TOKENS and not (sp.is_control(idx) or sp.is_unknown(idx)):
                raise ValueError(f"{self.model_file}: token {token!r} must be a control symbol, not ordinary text")
        if self.vocab_size <= max(BOS_ID, EOS_ID, PAD_ID):
            raise ValueError(f"{self.model_file}: vocabulary of {self.vocab_size} pieces has no room for the fixed "
                             f"ids BOS={BOS_ID}, EOS={EOS_ID}")

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def piece_id(self, piece: str) -> int:
        return self._sp.piece_to_id(piece)

    def tokenize(self, text: str) -> List[int]:
        return list(self._sp.encode_as_ids(text))

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._sp.decode_ids(list(ids))

    def __call__(self, prompts: Sequence[str], max_length: int = STEP_MAX_LENGTH) -> TokenBatch:
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings; wrap a single prompt as [prompt]")
        if int(max_length) < 2:
            raise ValueError(f"max_length={max_length} must be at least 2 (room for BOS and EOS)")
        max_length = int(max_length)
        rows = [self.tokenize(p)[: max_length - 2] for p in prompts] if len(prompts) else [[]]
        ids = np.full((len(rows), max_length), PAD_ID, dtype=np.int64)
        mask = np.zeros((len(rows), max_length), dtype=np.int64)
        for i, pieces in enumerate(rows):
            row = [BOS_ID] + pieces + [EOS_ID]
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        return TokenBatch(ids, mask)
