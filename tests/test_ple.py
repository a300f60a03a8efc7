"""Where the per-layer embedding table lives: the choice at load, and identical tokens either way."""

from __future__ import annotations

import pytest

from mlx_gemma4 import load, stream_generate
from mlx_gemma4 import ple
from mlx_gemma4.conversion import convert
from tests.tiny import make_model, save_checkpoint


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    base = tmp_path_factory.mktemp("ple")
    from tests.fixtures_tokenizer import make_tokenizer

    src = save_checkpoint(make_model("e", hidden_size_per_layer_input=32), base / "src")
    make_tokenizer(src)
    return {bits: convert(src, base / f"q{bits}", q_bits=bits, q_group_size=32, dtype="float32")
            for bits in (None, 8)}


def test_forced_placements_are_kept():
    assert ple.choose_placement(10**12, 10**12, mapped=False).mapped is False
    assert ple.choose_placement(1, 1, mapped=True).mapped is True


def test_auto_placement_follows_the_memory_budget(monkeypatch):
    monkeypatch.setattr(ple, "memory_budget", lambda: (10 * 10**9, "test budget"))
    roomy = ple.choose_placement(2 * 10**9, 3 * 10**9)          # 5 GB of 10: fits under 60 %
    tight = ple.choose_placement(2 * 10**9, 5 * 10**9)          # 7 GB of 10: does not
    assert not roomy.mapped and tight.mapped
    assert "test budget" in str(tight) and "memory-mapped" in str(tight)
    monkeypatch.setattr(ple, "memory_budget", lambda: None)
    assert ple.choose_placement(1, 1).mapped  # unknown memory: the lean choice


def test_memory_budget_reads_this_machine():
    budget = ple.memory_budget()
    assert budget is not None and budget[0] > 10**8


def test_load_reports_its_choice(converted, monkeypatch):
    model, _ = load(converted[8])
    assert model.ple_placement is not None and not model.ple_placement.mapped  # a tiny table always fits
    assert type(model.language_model.embed_tokens_per_layer).__name__ != "MappedPerLayerEmbedding"
    monkeypatch.setattr(ple, "memory_budget", lambda: (1000, "a tiny machine"))
    model, _ = load(converted[8])
    assert model.ple_placement.mapped
    assert type(model.language_model.embed_tokens_per_layer).__name__ == "MappedPerLayerEmbedding"


@pytest.mark.parametrize("bits", [None, 8])
def test_mapped_and_resident_tables_give_the_same_tokens_across_the_window(converted, bits):
    # 60 generated tokens cross the tiny sliding window (8) many times; prefill in chunks too.
    out = {}
    for mapped in (True, False):
        model, processor = load(converted[bits], mapped_ple=mapped)
        assert model.ple_placement.mapped is mapped
        out[mapped] = [r.token for r in stream_generate(model, processor, "a b c d e f g h i j k l", max_tokens=60,
                                                        stop_ids=[], prefill_chunk=5)]
    assert out[True] == out[False]
    assert len(set(out[True])) > 1
