"""Gemma 4 tokenizer: loading, special tokens, chat template, and splitting thoughts from answers.

Text is tokenized by the checkpoint's own tokenizer through transformers' tokenizer classes (no remote code), so
ids match the reference exactly. Special token strings and ids are read from the tokenizer and from the model's
config.json, never assumed. Chat prompts are rendered from the checkpoint's chat template; a copy of Gemma 4's
template ships with the package for checkpoints that carry none.

Gemma 4 prompt format (what the template produces):
    <bos><|turn>system\n<|think|>\nSYSTEM<|tool>declaration:...<tool|><turn|>\n
    <|turn>user\nHello<turn|>\n<|turn>model\n
The model writes its thoughts as ``<|channel>thought\n...<channel|>`` before the answer and ends a turn with
``<turn|>``. Thoughts are dropped from history by the template.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import ConfigError, InputError

logger = logging.getLogger(__name__)

BUNDLED_TEMPLATE = Path(__file__).with_name("chat_template.jinja")

# name -> (tokenizer attribute holding the string, config.json key holding the id).
_SPECIALS: dict[str, tuple[str | None, str | None]] = {
    "bos": ("bos_token", "bos_token_id"),
    "eos": ("eos_token", None),  # config eos_token_id may be a list; see eos_token_ids
    "pad": ("pad_token", "pad_token_id"),
    "turn_open": ("sot_token", None),
    "turn_close": ("eot_token", None),
    "channel_open": ("soc_token", None),
    "channel_close": ("eoc_token", None),
    "think": ("think_token", None),
    "image": ("image_token", "image_token_id"),
    "boi": ("boi_token", "boi_token_id"),
    "eoi": ("eoi_token", "eoi_token_id"),
    "audio": ("audio_token", "audio_token_id"),
    "boa": ("boa_token", "boa_token_id"),
    "eoa": ("eoa_token", "eoa_token_id"),
    "video": ("video_token", "video_token_id"),
}
# transformers' Gemma4Processor hard-codes the video placeholder (its tokenizer_config.json does not name it).
_VIDEO_FALLBACK = "<|video|>"


def bundled_chat_template() -> str:
    """The copy of Gemma 4's chat template (google/gemma-4-E4B-it) shipped with this package."""
    return BUNDLED_TEMPLATE.read_text(encoding="utf-8")


def read_json_object(path: Path) -> dict[str, Any] | None:
    """A checkpoint's JSON settings file as a dict; None when it is absent, a ConfigError when it is no object."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); re-download or re-convert the checkpoint.") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} holds {json.dumps(data)[:40]}, not a JSON object; re-download or re-convert the "
                          "checkpoint.")
    return data


def find_chat_template(path: str | Path) -> str | None:
    """The chat template a checkpoint directory ships, looked up where transformers looks, or None."""
    path = Path(path)
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        data = read_json_object(path / name) or {}
        tpl = data.get("chat_template")
        if isinstance(tpl, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
            tpl = named.get("default") or next(iter(named.values()), None)
        if isinstance(tpl, str) and tpl:
            return tpl
    return None


@dataclass(frozen=True)
class SpecialToken:
    text: str
    id: int


@dataclass(frozen=True)
class SpecialTokens:
    """Gemma 4's special tokens as this checkpoint spells and numbers them (None where it has none)."""

    bos: SpecialToken | None = None
    eos: SpecialToken | None = None
    pad: SpecialToken | None = None
    turn_open: SpecialToken | None = None
    turn_close: SpecialToken | None = None
    channel_open: SpecialToken | None = None
    channel_close: SpecialToken | None = None
    think: SpecialToken | None = None
    image: SpecialToken | None = None
    boi: SpecialToken | None = None
    eoi: SpecialToken | None = None
    audio: SpecialToken | None = None
    boa: SpecialToken | None = None
    eoa: SpecialToken | None = None
    video: SpecialToken | None = None

    def as_dict(self) -> dict[str, SpecialToken]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def config_token_ids(config: dict[str, Any] | None) -> dict[str, Any]:
    """Special token ids named in a Gemma 4 config.json (top level, falling back to text_config)."""
    config = config or {}
    text = config.get("text_config") or {}
    out: dict[str, Any] = {}
    for key in ("bos_token_id", "pad_token_id", "eos_token_id", "image_token_id", "boi_token_id",
                "eoi_token_id", "audio_token_id", "boa_token_id", "video_token_id"):
        value = config.get(key, text.get(key))
        if value is not None:
            out[key] = value
    eoa = config.get("eoa_token_id", config.get("eoa_token_index"))  # transformers spells it eoa_token_index
    if eoa is not None:
        out["eoa_token_id"] = eoa
    return out


def resolve_special_tokens(hf_tokenizer: Any, config: dict[str, Any] | None = None) -> SpecialTokens:
    """Match the tokenizer's special token strings with config.json's ids; raise ConfigError if they disagree."""
    ids = config_token_ids(config)
    unk = getattr(hf_tokenizer, "unk_token_id", None)
    resolved: dict[str, SpecialToken] = {}
    for name, (attr, key) in _SPECIALS.items():
        text = getattr(hf_tokenizer, attr, None) if attr else None
        text = text if isinstance(text, str) and text else None
        cfg_id = ids.get(key) if key else None
        if text is None and cfg_id is not None:
            text = hf_tokenizer.convert_ids_to_tokens(int(cfg_id))
        if text is None and name == "video":
            text = _VIDEO_FALLBACK
        if text is None:
            continue
        tok_id = hf_tokenizer.convert_tokens_to_ids(text)
        if tok_id is None or (tok_id == unk and name != "unk"):
            if cfg_id is None:
                logger.debug("special token %s (%r) is not in the vocabulary", name, text)
                continue
            raise ConfigError(f"config.json names {key}={cfg_id} but the tokenizer has no {text!r} token; the "
                              "tokenizer files do not belong to this model. Re-download or re-convert it.")
        if cfg_id is not None and int(cfg_id) != tok_id:
            raise ConfigError(f"the tokenizer maps {text!r} to id {tok_id} but config.json says {key}={cfg_id}; "
                              "the tokenizer and config.json come from different checkpoints.")
        resolved[name] = SpecialToken(text, int(tok_id))
    return SpecialTokens(**resolved)


def split_thinking(text: str) -> tuple[str, str]:
    """Split model output into (thinking, answer).

    Thoughts are ``<|channel>thought\\n...<channel|>`` blocks (decode with special tokens kept). An unfinished
    block at the end (still streaming) counts as thinking in full; a channel label still being written counts
    as nothing yet. Several blocks are joined with a newline; the answer is what lies outside them, stripped.
    """
    open_tok, close_tok, label = "<|channel>", "<channel|>", "thought\n"
    thoughts: list[str] = []
    answer: list[str] = []
    rest = text
    while open_tok in rest:
        before, rest = rest.split(open_tok, 1)
        answer.append(before.replace(close_tok, ""))  # a closing marker that closes nothing is dropped
        body, closed, rest = rest.partition(close_tok)
        if body.startswith(label):
            body = body[len(label):]
        elif not closed and label.startswith(body):
            body = ""  # the label itself is still streaming in
        elif body.startswith(label.strip()) and (not closed or body == label.strip()):
            body = body[len(label.strip()):]
        if body.strip():
            thoughts.append(body.strip())
        if not closed:
            rest = ""
    answer.append(rest.replace(close_tok, ""))
    return "\n".join(thoughts), "".join(answer).strip()


class Tokenizer:
    """The checkpoint's tokenizer plus its chat template, special tokens and stop ids."""

    def __init__(self, hf_tokenizer: Any, chat_template: str | None = None, config: dict[str, Any] | None = None,
                 generation_config: dict[str, Any] | None = None) -> None:
        self.hf = hf_tokenizer
        self.chat_template = chat_template or bundled_chat_template()
        self.special = resolve_special_tokens(hf_tokenizer, config)
        self.eos_token_ids = self._eos_ids(config, generation_config)
        self._detokenizer: Any = None  # built on first use, see make_detokenizer

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json / tokenizer_config.json, config.json and the chat template from a local directory."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
            spm = " (tokenizer.model alone does not say how to read it)" if (path / "tokenizer.model").is_file() else ""
            raise ConfigError(f"no tokenizer.json or tokenizer_config.json in {path}{spm}. Copy both from the "
                              "original checkpoint (every Gemma 4 checkpoint on the hub has them) into it.")
        for name in ("tokenizer_config.json", "special_tokens_map.json"):  # transformers' errors name neither
            read_json_object(path / name)
        try:
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot load the tokenizer in {path}: {e}") from e
        template = find_chat_template(path)
        if template is None:
            logger.info("no chat template in %s; using the bundled Gemma 4 template", path)
        return cls(hf, template, read_json_object(path / "config.json"),
                   read_json_object(path / "generation_config.json"))

    def _eos_ids(self, config: dict[str, Any] | None, generation_config: dict[str, Any] | None) -> list[int]:
        out: list[int] = []
        for name, source in (("config.json", config_token_ids(config).get("eos_token_id")),
                             ("generation_config.json", (generation_config or {}).get("eos_token_id"))):
            for i in source if isinstance(source, list) else [source]:
                if i is not None and (isinstance(i, bool) or not isinstance(i, int) or i < 0):
                    raise ConfigError(f"{name}: eos_token_id holds {json.dumps(i)[:40]}; it must be a token id (a "
                                      "whole number from 0) or a list of them. Fix that entry or download it again.")
                if i is not None and i not in out:
                    out.append(i)
        for tok in (self.special.eos, self.special.turn_close):
            if tok is not None and tok.id not in out:
                out.append(tok.id)
        return out

    @property
    def bos_token(self) -> str | None:
        return self.special.bos.text if self.special.bos else None

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @staticmethod
    def check_text(text: str) -> None:
        """InputError unless `text` is a string that can be encoded as UTF-8 (no lone surrogates)."""
        if not isinstance(text, str):
            raise InputError(f"The prompt must be a string; got {type(text).__name__}.")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InputError(
                f"The prompt has an unpaired surrogate character ({ascii(text[e.start])}) at position {e.start}, "
                "which is not valid text (it comes from bytes decoded with errors='surrogateescape' or a broken "
                "copy). Remove it, or decode the source text as UTF-8 with errors='replace'.") from e

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; BOS is added the way the checkpoint's tokenizer adds it, but never twice."""
        self.check_text(text)
        if add_special_tokens and self.bos_token and text.startswith(self.bos_token):
            add_special_tokens = False
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | list[int]:
        return self.hf.convert_tokens_to_ids(tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            enable_thinking: bool = False, tools: list[Any] | None = None,
                            tokenize: bool = False, **kwargs: Any) -> str | list[int]:
        """Render `messages` with the checkpoint's chat template.

        A message's content is a string or a list of parts {"type": "text", "text": ...} /
        {"type": "image" | "audio" | "video", ...}; media parts become the placeholder the template writes.
        `tools` are JSON-schema dicts or plain Python functions (see mlx_gemma4.tools.tool_schema). Assistant
        messages may carry ``tool_calls`` and ``role: "tool"`` messages answer them (see mlx_gemma4.tool_use).
        """
        from ..tool_use import prepare_messages
        from ..tools import tool_schemas

        if isinstance(messages, (list, tuple)) and not messages:  # transformers' ValueError, as an InputError
            raise InputError("There are no messages to render; pass at least one, like {'role': 'user', "
                             "'content': 'Hello'}.")
        from jinja2 import TemplateSyntaxError

        try:
            prompt = self.hf.apply_chat_template(
                prepare_messages(messages), chat_template=self.chat_template, tools=tool_schemas(tools),
                add_generation_prompt=add_generation_prompt,
                enable_thinking=enable_thinking, tokenize=False, **kwargs)
        except TemplateSyntaxError as e:
            raise ConfigError(f"The checkpoint's chat template does not parse (line {e.lineno}: {e.message}). Fix "
                              "it in chat_template.jinja (or the chat_template entry of tokenizer_config.json / "
                              "chat_template.json), or delete it to use the bundled Gemma 4 template.") from e
        return self.encode(prompt) if tokenize else prompt

    def make_detokenizer(self) -> Any:
        """A fresh mlx-lm streaming detokenizer that fits this tokenizer's decoder.

        Building one reads the whole vocabulary (the SPM detokenizer maps every id to its bytes: about a second
        for Gemma 4's 262,144 entries), so that is done once per tokenizer; each call gets a reset copy that
        shares the read-only map and has its own streaming state. Its pieces join into ``decode(ids)``
        (see detokenizer.py).
        """
        if self._detokenizer is None:
            from mlx_lm.tokenizer_utils import NaiveStreamingDetokenizer

            from .detokenizer import ByteRunDetokenizer

            decoder = json.loads(self.hf.backend_tokenizer.to_str()).get("decoder") or {}
            steps = [d.get("type") for d in decoder.get("decoders", [])] if decoder.get("type") == "Sequence" else []
            if steps[:3] == ["Replace", "ByteFallback", "Fuse"]:
                self._detokenizer = ByteRunDetokenizer(self.hf, trim_space=steps[3:] == ["Strip"])
            else:
                self._detokenizer = NaiveStreamingDetokenizer(self.hf)
        detokenizer = copy.copy(self._detokenizer)
        detokenizer.reset()
        return detokenizer
