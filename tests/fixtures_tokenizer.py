"""The tiny Gemma-4-like tokenizer of the tests (see mlx_gemma4.demo for how it is built)."""

from __future__ import annotations

from pathlib import Path

from mlx_gemma4.demo import SPECIAL_STRINGS, TOOL_TOKENS, write_tokenizer  # noqa: F401  (re-exported for tests)
from tests.tiny import SPECIAL_IDS, VOCAB


def make_tokenizer(path: Path | str, special_ids: dict[str, int] = SPECIAL_IDS, *, add_bos: bool = True,
                   chat_template: bool = True, processor_config: bool = True) -> Path:
    """Write tokenizer.json, tokenizer_config.json, chat_template.jinja and processor_config.json into `path`."""
    return write_tokenizer(path, special_ids, vocab_size=VOCAB, add_bos=add_bos, chat_template=chat_template,
                           processor_config=processor_config)
