"""Streaming text for SentencePiece-style tokenizers (Gemma's), piece for piece what the full decode gives.

mlx-lm's ``SPMStreamingDetokenizer`` decodes the bytes of byte-fallback tokens (``<0xE6>``) with Python's
``errors="replace"``. The tokenizer's own ``ByteFallback`` decoder judges a run of byte tokens as a whole: a run
that is valid UTF-8 is its text, any other run is one U+FFFD per byte (valid characters in it included). So a
run is held here until a token that is not a byte ends it (or the stream ends), then decoded by that rule, and
the streamed pieces join into exactly ``tokenizer.decode(ids)``.
"""

from __future__ import annotations

from mlx_lm.tokenizer_utils import SPMStreamingDetokenizer


class ByteRunDetokenizer(SPMStreamingDetokenizer):
    def __init__(self, tokenizer, trim_space: bool = False) -> None:
        super().__init__(tokenizer, trim_space=trim_space)
        vocab = tokenizer.get_vocab()
        names = (f"<0x{b:02X}>" for b in range(256))
        self._byte_ids = frozenset(vocab[name] for name in names if name in vocab)

    def reset(self) -> None:
        super().reset()
        self._run = b""  # bytes of the byte tokens since the last other token

    def add_token(self, token: int) -> None:
        self.tokens.append(token)
        if token in self._byte_ids:
            self._run += self.tokenmap[token]
            return
        self._end_run()
        self._emit(self.tokenmap[token].decode("utf-8").replace("\u2581", " "))

    def finalize(self) -> None:
        self._end_run()

    def _end_run(self) -> None:
        if not self._run:
            return
        try:
            text = self._run.decode("utf-8")
        except UnicodeDecodeError:
            text = "\ufffd" * len(self._run)
        self._run = b""
        self._emit(text)

    def _emit(self, text: str) -> None:
        if not self.text and self.trim_space and text.startswith(" "):
            text = text[1:]  # the decoder's Strip step: one leading space of the whole text
        self.text += text
