"""The token loop and its public wrappers: injected policies, argument checks, the context bound, and nothing
vocabulary-sized rebuilt per call."""

from __future__ import annotations

import math
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlx_gemma4 import InputError, generate, stream_generate
from mlx_gemma4.generation import check_sampling_args, generate_step, stream_tokens
from mlx_gemma4.processing.processor import Processor
from mlx_gemma4.weights import load_model


@pytest.fixture(scope="module")
def loaded(checkpoint_factory):
    _, path = checkpoint_factory("e")
    return load_model(path), Processor.from_pretrained(path)


# -- the public import paths --------------------------------------------------------------------------------------
@pytest.mark.parametrize("first", ["", "import mlx_gemma4.generation", "import mlx_gemma4.chat",
                                   "import mlx_gemma4.generation, mlx_gemma4.chat", "import mlx_gemma4.weights"])
def test_public_names_import_in_a_fresh_interpreter(first):
    code = (f"{first}\nfrom mlx_gemma4 import load, generate, stream_generate, ChatSession\n"
            "import inspect\n"
            "assert all(inspect.isfunction(f) for f in (load, generate, stream_generate)), (load, generate)\n"
            "assert inspect.isclass(ChatSession)\n"
            "import mlx_gemma4\n"
            "assert mlx_gemma4.generate is generate\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- injected policies ---------------------------------------------------------------------------------------------
def test_generate_step_uses_the_callers_sampler_and_processors(loaded):
    model, processor = loaded
    inputs = processor(text="hello there")
    seen = []

    def forbid_greedy(history, logits):
        seen.append(int(history.size))
        return logits - 1e9 * (mx.arange(logits.shape[-1]) == 7)[None]

    def pick_seven_or_eight(logprobs):
        # token 7 is forbidden by the processor, so the sampler must see -1e9 there and take 8
        return mx.where(logprobs[:, 7] > -1e8, 7, 8).reshape(1)

    loop = generate_step(model, inputs, sampler=pick_seven_or_eight, logits_processors=[forbid_greedy],
                         max_tokens=4)
    tokens = [t for t, _ in loop]
    assert tokens == [8, 8, 8, 8]
    L = int(np.array(inputs["input_ids"]).size)
    assert seen == [L, L + 1, L + 2, L + 3]  # the history grows by each generated token
    assert loop.finish_reason == "length"


@pytest.mark.parametrize("sampler, processor, said", [
    (lambda lp: mx.array([10**6]), None, "picked token id 1000000, outside the vocabulary"),
    (lambda lp: 5, None, "The sampler returned an int"),
    (lambda lp: mx.array([1.5]), None, "dtype mlx.core.float32"),               # (it became token 1, in silence)
    (lambda lp: mx.argmax(lp, axis=-1, keepdims=True)[None], None, None),     # one id in any shape: fine
    (None, lambda h, logits: logits[..., :10], "A logits processor returned an array of shape (1, 10)"),
])
def test_a_sampler_or_processor_that_returns_the_wrong_thing_is_named(loaded, sampler, processor, said):
    """A sampler's id outside the vocabulary was an IndexError deep inside, a float id or a processor's cut logits
    went through in silence."""
    model, tokenizer = loaded

    def run():
        return [t for t, _ in generate_step(model, tokenizer(text="hi"), sampler=sampler, max_tokens=2,
                                            logits_processors=[processor] if processor else [])]

    if said is None:
        assert len(run()) == 2
        return
    with pytest.raises(InputError) as e:
        run()
    assert said in str(e.value)


def test_logprobs_are_normalised(loaded):
    model, processor = loaded
    for _, logprobs in generate_step(model, processor(text="hi"), max_tokens=3):
        assert abs(float(mx.logsumexp(logprobs))) < 1e-4


def test_context_full_stops_with_its_own_reason(loaded):
    model, processor = loaded
    inputs = processor(text="one two three")
    L = int(np.array(inputs["input_ids"]).size)
    limit = model.config.text_config.max_position_embeddings
    cache = model.make_cache()
    out = list(stream_tokens(model, processor, inputs, cache, max_tokens=10 * limit, stop_ids=[]))
    # positions 0..limit-1: the prompt plus every generated token but the last fill the context exactly
    assert len(out) == limit - L + 1
    assert out[-1].finish_reason == "context"
    assert all(r.finish_reason is None for r in out[:-1])


def test_on_token_matches_what_the_cache_holds(loaded):
    model, processor = loaded
    inputs = processor(text="count with me")
    L = int(np.array(inputs["input_ids"]).size)
    cache, fed = model.make_cache(), []
    for i, r in enumerate(stream_tokens(model, processor, inputs, cache, max_tokens=20, stop_ids=[],
                                        on_token=fed.append)):
        if i == 4:
            break  # the caller stops early: every token it was told about is in the cache
    assert cache[0].offset == L + len(fed) and len(fed) == 5


def test_a_prompt_already_in_the_cache_starts_from_its_kept_logits(loaded):
    model, processor = loaded
    inputs = processor(text="count with me, one two three four five")
    L = int(np.array(inputs["input_ids"]).size)
    ends = []
    want = list(stream_tokens(model, processor, inputs, model.make_cache(), max_tokens=10, stop_ids=[],
                              on_prefilled=ends.append, repetition_penalty=1.5))
    [end] = ends
    assert end.logits.shape == (model.config.text_config.vocab_size,) and end.hidden is None
    cache = model.make_cache()
    logits = model.prefill(inputs, cache)
    assert cache[0].offset == L
    for prefilled in (logits, end):  # a bare logits array or what on_prefilled was given
        c = model.make_cache()
        model.prefill(inputs, c)
        got = list(stream_tokens(model, processor, inputs, c, prefilled=prefilled, max_tokens=10, stop_ids=[],
                                 repetition_penalty=1.5))
        assert [r.token for r in got] == [r.token for r in want] and got[-1].prompt_tokens == 0
    with pytest.raises(InputError, match="holds 0 tokens"):
        generate_step(model, inputs, model.make_cache(), prefilled=end)
    with pytest.raises(InputError, match="prefilled must be"):
        generate_step(model, inputs, cache, prefilled=[1.0])


# -- arguments ---------------------------------------------------------------------------------------------------
BAD = [
    dict(max_tokens=0), dict(max_tokens=-3), dict(max_tokens=2.5), dict(max_tokens=True), dict(max_tokens="5"),
    dict(temperature=-1), dict(temperature=float("nan")), dict(temperature=float("inf")), dict(temperature="hot"),
    dict(top_p=1.5), dict(top_p=0), dict(top_p=-0.5), dict(top_p=float("nan")),
    dict(top_k=-1), dict(top_k=2.0), dict(min_p=1.0), dict(min_p=-0.1),
    dict(repetition_penalty=0), dict(repetition_penalty=-1.0), dict(repetition_penalty=float("nan")),
    dict(repetition_context_size=0), dict(seed=-1), dict(seed=1.5), dict(seed="x"),
    dict(prefill_chunk=0), dict(prefill_chunk=-1),
]


@pytest.mark.parametrize("bad", BAD, ids=[f"{k}={v!r}" for b in BAD for k, v in b.items()])
def test_bad_arguments_are_refused_naming_the_argument(loaded, bad):
    model, processor = loaded
    name = next(iter(bad))
    with pytest.raises(InputError, match=name):
        generate(model, processor, "hi", **bad)
    with pytest.raises(InputError, match=name):
        next(iter(stream_generate(model, processor, "hi", **bad)))


def test_unknown_keyword_is_refused(loaded):
    model, processor = loaded
    with pytest.raises(InputError, match="max_token"):
        generate(model, processor, "hi", max_token=3)


def test_max_soft_tokens_is_accepted(loaded):
    model, processor = loaded
    assert isinstance(generate(model, processor, "hi", max_tokens=2, max_soft_tokens=70), str)


_numbers = st.one_of(st.integers(-10, 10), st.floats(allow_nan=True, allow_infinity=True), st.none(),
                     st.booleans(), st.text(max_size=2))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(max_tokens=_numbers, temperature=_numbers, top_p=_numbers, top_k=_numbers, min_p=_numbers,
       repetition_penalty=_numbers, seed=_numbers, prefill_chunk=_numbers)
def test_argument_checks_accept_exactly_the_valid_ranges(**kw):
    def valid() -> bool:
        def real(x):
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        def whole(x, lo):
            return isinstance(x, int) and not isinstance(x, bool) and x >= lo

        return (whole(kw["max_tokens"], 1) and real(kw["temperature"]) and kw["temperature"] >= 0
                and real(kw["top_p"]) and 0 < kw["top_p"] <= 1 and whole(kw["top_k"], 0)
                and real(kw["min_p"]) and 0 <= kw["min_p"] < 1
                and (kw["repetition_penalty"] is None or (real(kw["repetition_penalty"])
                                                          and kw["repetition_penalty"] > 0))
                and (kw["seed"] is None or whole(kw["seed"], 0)) and whole(kw["prefill_chunk"], 1))

    try:
        check_sampling_args(**kw)
        accepted = True
    except InputError as e:
        accepted = False
        assert "must be" in str(e)
    assert accepted == valid()


def test_sampling_runs_for_valid_edge_values(loaded):
    model, processor = loaded
    for kw in (dict(temperature=0.0), dict(temperature=1e-3, top_p=1.0), dict(temperature=2.0, top_p=1e-6),
               dict(temperature=1.0, top_k=1), dict(temperature=1.0, min_p=0.99), dict(repetition_penalty=1e-3),
               dict(seed=2**64 - 1, temperature=1.0)):
        out = list(stream_generate(model, processor, "hi", max_tokens=3, stop_ids=[], **kw))
        assert len(out) == 3 and all(0 <= r.token < model.config.text_config.vocab_size for r in out)


def test_a_vanishing_temperature_is_greedy(loaded):
    """The sampler divides the logits by the temperature: at 1e-38 they overflowed to infinity and tokens were
    drawn at random; under MIN_TEMPERATURE sampling is greedy, its limit."""
    model, processor = loaded
    run = dict(max_tokens=6, stop_ids=[], seed=3)
    greedy = [r.token for r in stream_generate(model, processor, "hi", temperature=0.0, **run)]
    for t in (1e-7, 1e-38, 1e-45, 5e-324):
        assert [r.token for r in stream_generate(model, processor, "hi", temperature=t, **run)] == greedy, t


def test_a_top_k_of_the_whole_vocabulary_or_more_is_off(loaded):
    # mlx-lm's top-k refuses k >= vocabulary mid-sampling, and that failure left MLX's random state unusable for
    # every later sampled call in the process.
    model, processor = loaded
    vocab = model.config.text_config.vocab_size
    run = dict(max_tokens=6, stop_ids=[], temperature=1.0, seed=7)
    want = [r.token for r in stream_generate(model, processor, "hi", **run)]
    for k in (vocab, vocab + 1, 10**9):
        assert [r.token for r in stream_generate(model, processor, "hi", top_k=k, **run)] == want
    assert [r.token for r in stream_generate(model, processor, "hi", top_k=vocab - 1, **run)]


def test_numpy_numbers_are_taken_for_every_setting(loaded):
    """A numpy float32 repetition_penalty passed our checks and was then refused by mlx-lm (a ValueError)."""
    model, processor = loaded
    run = dict(max_tokens=4, stop_ids=[], seed=np.uint64(5))
    # values float32 holds exactly, so the numpy run must sample what the plain one does
    plain = dict(temperature=0.75, top_p=0.875, top_k=5, min_p=0.0625, repetition_penalty=1.25,
                 repetition_context_size=8)
    want = [r.token for r in stream_generate(model, processor, "hi", **run, **plain)]
    as_numpy = {k: (np.int64(v) if isinstance(v, int) else np.float32(v)) for k, v in plain.items()}
    assert [r.token for r in stream_generate(model, processor, "hi", **run, **as_numpy)] == want


BAD_POLICIES = [
    dict(sampler=5), dict(logits_processors=5), dict(logits_processors=[5]), dict(logits_processors=len),
    dict(logits_processors=[None]),
    dict(should_stop=True), dict(on_token="x"), dict(progress=1), dict(on_prefilled=[]),
    dict(stop_ids=1), dict(stop_ids="<eos>"), dict(stop_ids=["<eos>"]), dict(stop_ids=[1.0]), dict(stop_ids=[-1]),
]


@pytest.mark.parametrize("bad", BAD_POLICIES, ids=[f"{k}={v!r}" for b in BAD_POLICIES for k, v in b.items()])
def test_bad_callables_and_stop_ids_are_refused_before_any_work(loaded, bad):
    # The image does not exist: a check that ran after the processor would report the missing file instead.
    model, processor = loaded
    name = next(iter(bad))
    with pytest.raises(InputError, match=name):
        generate(model, processor, "<|image|> hi", images=["/no/such/image.png"], **bad)
    inputs = processor(text="hi")
    with pytest.raises(InputError, match=name):
        next(iter(stream_tokens(model, processor, inputs, **bad)))


def test_model_and_processor_swapped_or_missing_are_named(loaded):
    """generate(processor, model, ...) was a TypeError from Gemma4.__call__, generate(None, ...) an AttributeError."""
    model, processor = loaded
    for args in ((processor, model), (None, processor), (model, None)):
        with pytest.raises(InputError, match="model, processor = load"):
            generate(*args, "hi", max_tokens=2)


def test_generate_step_names_inputs_without_ids_and_a_foreign_cache(loaded):
    model, processor = loaded
    with pytest.raises(InputError, match="dict with input_ids"):
        list(generate_step(model, {}, max_tokens=2))
    with pytest.raises(InputError, match="make_cache"):
        list(generate_step(model, processor(text="hi"), [1, 2], max_tokens=2))


@pytest.mark.parametrize("kw, tower", [(dict(images=["/no/such.png"]), "vision"),
                                       (dict(videos="/no/such.mp4"), "vision"),
                                       (dict(audio=np.zeros(16000, np.float32)), "audio")])
def test_media_for_a_tower_the_model_lacks_is_refused_before_it_is_read(loaded, kw, tower):
    """The media used to be decoded and preprocessed first (the file here does not even exist)."""
    model, processor = loaded
    kind = {"images": "image", "videos": "video", "audio": "audio"}[next(iter(kw))]
    with pytest.raises(InputError, match=f"no {tower} tower; it cannot take {kind}"):
        generate(model, processor, f"<|{kind}|> hi", max_tokens=2, **kw)
    assert generate(model, processor, "hi", max_tokens=2, images=[], audio=None)   # none given: fine


@pytest.mark.parametrize("start", [-1, 2, 100, "1", 1.0])
def test_a_start_the_cache_does_not_hold_is_refused(loaded, start):
    """start=2 with an empty cache put the prompt's tokens 2.. at positions 0.. without a word; -1 ran the last
    token alone."""
    model, processor = loaded
    with pytest.raises(InputError, match="start must be 0 or the number"):
        generate_step(model, processor(text="hello there"), model.make_cache(), start=start, max_tokens=2)


def test_start_is_what_the_cache_holds_or_a_continuation_after_it(loaded):
    model, processor = loaded
    inputs = processor(text="hello there, how are you")
    want = [t for t, _ in generate_step(model, inputs, max_tokens=4)]
    cache = model.make_cache()
    model.prefill({"input_ids": inputs["input_ids"][:, :3]}, cache)
    assert [t for t, _ in generate_step(model, inputs, cache, start=3, max_tokens=4)] == want
    # start 0 with a cache that holds something: the prompt runs after it, as with mlx-lm's prompt cache
    assert len([t for t, _ in generate_step(model, inputs, cache, max_tokens=2)]) == 2


def test_draft_tokens_without_an_assistant_is_refused_before_any_work(loaded):
    model, processor = loaded
    with pytest.raises(InputError, match="draft_tokens"):
        generate(model, processor, "<|image|> hi", images=["/no/such/image.png"], draft_tokens=3)


# -- nothing vocabulary-sized per call -------------------------------------------------------------------------
def test_detokenizer_and_vocabulary_tables_are_built_once(loaded, monkeypatch):
    model, processor = loaded
    hf = processor.tokenizer.hf
    calls = {"convert_ids_to_tokens": 0, "to_str": 0, "get_vocab": 0}
    for name in ("convert_ids_to_tokens", "get_vocab"):
        original = getattr(hf, name)

        def counted(*a, _name=name, _orig=original, **k):
            calls[_name] += 1
            return _orig(*a, **k)

        monkeypatch.setattr(hf, name, counted)
    backend = hf.backend_tokenizer
    monkeypatch.setattr(type(hf), "backend_tokenizer",
                        property(lambda self: calls.__setitem__("to_str", calls["to_str"] + 1) or backend),
                        raising=False)
    generate(model, processor, "hello", max_tokens=3)
    after_first = dict(calls)
    for _ in range(3):
        generate(model, processor, "hello again", max_tokens=3)
    assert calls == after_first, (after_first, calls)


def test_detokenizers_of_concurrent_streams_are_independent(loaded):
    model, processor = loaded
    prompts = ("first prompt", "another, different prompt")

    def run(prompt):
        return stream_generate(model, processor, prompt, max_tokens=12, stop_ids=[])

    alone = ["".join(r.text for r in run(p)) for p in prompts]
    interleaved = [[], []]
    for ra, rb in zip(run(prompts[0]), run(prompts[1])):
        interleaved[0].append(ra.text)
        interleaved[1].append(rb.text)
    assert ["".join(t) for t in interleaved] == alone


def test_should_stop_between_prefill_chunks(loaded):
    model, processor = loaded
    inputs = processor(text="one two three four five six seven eight nine ten eleven twelve")
    asked, seen = [], []

    def stop_after_two_chunks():
        asked.append(1)
        return len(asked) > 2

    cache = model.make_cache()
    out = list(stream_tokens(model, processor, inputs, cache, max_tokens=5, prefill_chunk=3, stop_ids=[],
                             should_stop=stop_after_two_chunks, progress=lambda d, t: seen.append((d, t))))
    L = int(np.array(inputs["input_ids"]).size)
    assert len(out) == 1 and out[0].finish_reason == "cancelled" and out[0].token == -1
    assert cache[0].offset == 6                     # two chunks of three, then stopped
    assert seen[0] == (0, L) and seen[-1] == (6, L)


def test_on_token_matches_the_cache_when_a_stop_token_ends_the_answer(loaded):
    model, processor = loaded
    inputs = processor(text="count with me")
    L = int(np.array(inputs["input_ids"]).size)
    tokens = [r.token for r in stream_tokens(model, processor, inputs, max_tokens=8, stop_ids=[])]
    k = next(i for i in range(1, len(tokens)) if tokens[i] not in tokens[:i])
    cache, fed = model.make_cache(), []
    out = list(stream_tokens(model, processor, inputs, cache, max_tokens=8, stop_ids=[tokens[k]],
                             on_token=fed.append))
    assert out[-1].finish_reason == "stop" and len(out) == k + 1
    assert cache[0].offset == L + len(fed) and fed == tokens[: len(fed)]


def test_stopping_after_the_first_token_leaves_only_the_prompt_in_the_cache(loaded):
    model, processor = loaded
    inputs = processor(text="count with me")
    L = int(np.array(inputs["input_ids"]).size)
    cache, fed = model.make_cache(), []
    for _ in stream_tokens(model, processor, inputs, cache, max_tokens=8, stop_ids=[], on_token=fed.append):
        break
    assert fed == [] and cache[0].offset == L


def test_a_generation_read_on_from_another_thread_is_named(loaded):
    """A streaming web response resumes a plain generator on other threads: MLX failed there ("There is no
    Stream(cpu, 1) in current thread")."""
    import threading

    model, processor = loaded
    stream = stream_generate(model, processor, "hi", max_tokens=6)
    next(stream)
    caught = []
    t = threading.Thread(target=lambda: caught.append(pytest.raises(InputError, next, stream)))
    t.start()
    t.join()
    assert caught and "started on another thread" in str(caught[0].value) and "queue" in str(caught[0].value)
