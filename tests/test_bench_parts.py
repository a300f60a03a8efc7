"""benchmarks/parts.py's graph probe: a compiled decode step's nodes counted by primitive, and the host's time per
step against a queued loop's period."""

from __future__ import annotations

import mlx.core as mx

from benchmarks import parts


def test_the_graph_probe_counts_a_steps_nodes_and_times_host_and_period(checkpoint_factory):
    from mlx_gemma4.weights import load_model

    _, path = checkpoint_factory("e")
    model = load_model(path)
    cache = model.make_cache()
    mx.eval(model.prefill({"input_ids": mx.array([[2, 10, 11, 12, 13]])}, cache))
    y = mx.array([[5]], dtype=mx.int32)
    counts = parts._step_nodes(model.step(y, cache))
    layers = len(model.language_model.layers)
    assert counts["QuantizedMatmul"] + counts["Matmul"] >= 4 * layers   # (the tiny model is not quantized)
    assert counts["(all)"] == sum(v for k, v in counts.items() if k != "(all)")
    host, period = parts._host_and_period(model, cache, y, 4)
    assert 0 < host and 0 < period and host <= 4 * period
