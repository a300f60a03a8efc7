"""benchmarks/e2e.py's variants of our model (further prefill chunks, quantized prefill, kernel switches) and their
table lines."""

from __future__ import annotations

import argparse

import pytest

from benchmarks import e2e


def test_chunk_lists_parse_and_bad_ones_are_refused():
    assert e2e._chunks("2048") == [2048]
    assert e2e._chunks("2048,1024,512") == [2048, 1024, 512]
    for bad in ("0", "512,-1", "a", "512,,256"):
        with pytest.raises(argparse.ArgumentTypeError):
            e2e._chunks(bad)


def test_variants_share_the_loaded_model_and_differ_only_in_their_setting():
    ours = e2e.Ours.__new__(e2e.Ours)
    ours.model, ours.processor, ours.weights_gb, ours.note = object(), object(), 1.5, ""
    c512, qmm = ours.variant("ours-c512", prefill_chunk=512), ours.variant("ours-qmm", dense_prefill=False)
    assert (c512.name, c512.prefill_chunk, c512.dense_prefill) == ("ours-c512", 512, None)
    assert (qmm.name, qmm.prefill_chunk, qmm.dense_prefill) == ("ours-qmm", 2048, False)
    assert c512.model is qmm.model is ours.model and c512.weights_gb == qmm.weights_gb == 1.5
    assert (ours.name, ours.prefill_chunk, ours.dense_prefill) == ("ours", 2048, None)


def test_the_table_compares_every_variant_of_ours_with_each_peer():
    row = dict(ttft_ms=100.0, prefill_tps=1000.0, decode_tps=50.0, peak_gb=2.0, prefill_peak_gb=2.0)
    med = {"ours": row, "ours-qmm": dict(row, ttft_ms=150.0), "mlx-lm": dict(row, ttft_ms=200.0, decode_tps=40.0)}
    result = dict(size="e2b", q_bits=4, group=64, prompt_tokens=10, gen=4, runs=1, device="cpu", versions={},
                  median=med, weights_gb={k: 1.0 for k in med}, followup_ttft_ms={}, notes={}, errors={})
    table = e2e._table(result)
    assert "ours / mlx-lm: TTFT 0.50x, decode 1.25x" in table
    assert "ours-qmm / mlx-lm: TTFT 0.75x, decode 1.25x" in table
    assert "ours / ours-qmm" not in table and "mlx-lm / ours" not in table


def test_a_variant_runs_under_its_own_switches_and_puts_them_back():
    from mlx_gemma4 import decode_attention, few_rows

    ours = e2e.Ours.__new__(e2e.Ours)
    ours.model = type("Model", (), {"dense_prefill": None})()
    off = ours.variant("ours-da0", decode_attention=False, few_rows="0")
    before = (decode_attention.ENABLED, few_rows.ENABLED)
    with off._settings():
        assert (decode_attention.ENABLED, few_rows.ENABLED) == (False, False)
    assert (decode_attention.ENABLED, few_rows.ENABLED) == before
    with ours._settings():   # no settings of its own: the environment's stay
        assert (decode_attention.ENABLED, few_rows.ENABLED) == before
