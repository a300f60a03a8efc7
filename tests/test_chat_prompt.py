"""mlx_gemma4/processing/chat_prompt.py: chat messages as token ids, against the rendered template's tokenization.

For conversations whose text holds no control token, ``ChatEncoder.encode(messages)`` must give the ids of
``processor(text=processor.apply_chat_template(messages))``, and ``apply_chat_template`` must render what
transformers renders with the same template.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mlx_gemma4.processing.chat_prompt import ChatEncoder
from mlx_gemma4.processing.processor import Processor
from tests.fixtures_tokenizer import make_tokenizer

IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
WAVE = (0.1 * np.sin(np.arange(4000) / 10)).astype(np.float32)
TEXTS = st.sampled_from(["hello", " hi there ", "", "   ", "\n\nx\n", "a  b", "日本語 🎉", "x\ty", "é", "{a:1}"])
ANSWERS = st.one_of(TEXTS, st.just("<|channel>thought\nhm<channel|> done "))  # the template drops the thought
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def proc(tmp_path_factory):
    processor = Processor.from_pretrained(make_tokenizer(tmp_path_factory.mktemp("tok")))
    processor.image_processor.max_soft_tokens = 70  # short runs keep the examples fast
    return processor


@pytest.fixture(scope="module")
def ref(proc):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(proc.tokenizer.hf.name_or_path)


def _media(messages, kind):
    return [p[kind] for m in messages if isinstance(m.get("content"), list)
            for p in m["content"] if isinstance(p, dict) and p.get("type") == kind] or None


def _template_ids(proc, messages, **kw) -> list[int]:
    prompt = proc.apply_chat_template(messages, **kw)
    return proc(text=prompt, images=_media(messages, "image"), audio=_media(messages, "audio"))["input_ids"].tolist()[0]


def _content(draw, media: bool, texts=TEXTS):
    if draw(st.booleans()):
        return draw(texts)
    part = st.builds(lambda t: {"type": "text", "text": t}, texts)
    if media:
        part = st.one_of(part, st.just({"type": "image", "image": IMAGE}), st.just({"type": "audio", "audio": WAVE}))
    return draw(st.lists(part, max_size=3))


@st.composite
def conversations(draw):
    messages = [{"role": "system", "content": _content(draw, media=False)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        messages.append({"role": "user", "content": _content(draw, media=True)})
        if draw(st.booleans()):
            messages.append({"role": "assistant", "content": _content(draw, media=False, texts=ANSWERS)})
    return messages


@FAST
@given(messages=conversations(), thinking=st.booleans(), gen=st.booleans())
def test_conversations_encode_like_the_rendered_template(proc, ref, messages, thinking, gen):
    # System prompts (a string or parts, empty parts too), several turns, text as a string or parts, images and
    # audio in any order, answers that hold thoughts, thinking on and off, with and without the generation prompt.
    kw = dict(add_generation_prompt=gen, enable_thinking=thinking)
    assert proc.apply_chat_template(messages, **kw) == ref.apply_chat_template(messages, tokenize=False, **kw)
    assert ChatEncoder(proc).encode(messages, **kw).ids.tolist() == _template_ids(proc, messages, **kw)


VALUES = st.recursive(st.one_of(TEXTS, st.integers(-3, 3), st.booleans(), st.none()),
                      lambda inner: st.one_of(st.lists(inner, max_size=2),
                                              st.dictionaries(st.sampled_from(["a", "city"]), inner, max_size=2)),
                      max_leaves=4)
RESULTS = st.one_of(VALUES, st.just([{"type": "text", "text": "see"}, {"type": "image", "image": IMAGE}]))


@st.composite
def tool_rounds(draw):
    messages = [{"role": "user", "content": draw(TEXTS)}]
    for r in range(draw(st.integers(1, 2))):
        calls = [{"id": f"c{r}{k}", "type": "function",
                  "function": {"name": "weather", "arguments": {"city": draw(VALUES)}}}
                 for k in range(draw(st.integers(1, 2)))]
        messages.append({"role": "assistant", "content": draw(TEXTS), "tool_calls": calls})
        messages += [{"role": "tool", "tool_call_id": c["id"], "content": draw(RESULTS)} for c in calls]
    return messages


def weather(city: str) -> str:
    """The weather.

    Args:
        city: where
    """
    return "sunny"


@FAST
@given(messages=tool_rounds(), thinking=st.booleans())
def test_tool_calls_and_results_encode_like_the_rendered_template(proc, messages, thinking):
    # Arguments and results of any JSON shape, results with media beside results without (or with none at all).
    kw = dict(add_generation_prompt=True, enable_thinking=thinking, tools=[weather])
    assert ChatEncoder(proc).encode(messages, **kw).ids.tolist() == _template_ids(proc, messages, **kw)
