"""benchmarks/towers.py at ``--tiny`` widths in float32: our towers / embedders and processors give what mlx-vlm's
give, for the E4B towers and the 12B's encoder-free image and audio path."""

from __future__ import annotations

import pytest

pytest.importorskip("mlx_vlm")  # imported for real first, so the benchmark makes no stand-in mlx_vlm packages

from benchmarks.towers import main  # noqa: E402

SMALL = ["--tiny", "--compare", "mlx-vlm", "--dtype", "float32", "--runs", "1", "--image-width", "320",
         "--image-height", "240"]


def _by_impl(rows: list[dict]) -> dict:
    return {(r["tower"], r["case"], r["impl"]): r for r in rows}


def test_12b_image_and_audio_agree_with_mlx_vlm():
    rows = main(["--model", "12b", "--vision-tokens", "280", "--audio-seconds", "5", *SMALL])
    got = _by_impl(rows)
    cases = [("12b image", "280 tokens"), ("12b audio", "5 s")]
    for tower, case in cases:
        for stage in ("host", "model", "total"):
            assert {impl for (t, c, impl) in got if (t, c) == (tower, f"{case}, {stage}")} == {"ours", "mlx-vlm"}
        host = got[tower, f"{case}, host", "ours"]
        assert host["host_shapes_equal"] and host["host_max_abs_diff"] == 0.0
        assert host.get("host_image_position_ids_equal", host.get("host_input_features_mask_equal"))
        for stage in ("model", "total"):
            row = got[tower, f"{case}, {stage}", "ours"]
            assert row["shapes_equal"] and row["max_abs_diff"] <= 1e-5, row
    image = got["12b image", "280 tokens, model", "ours"]
    assert image["out_shape"] == [image["soft_tokens"], 128]
    assert got["12b audio", "5 s, model", "ours"]["out_shape"] == [125, 128]  # 5 s = 125 frames of 640 samples


def test_e4b_towers_agree_with_mlx_vlm():
    rows = main(["--vision-tokens", "70", "--audio-seconds", "1", *SMALL])
    compared = [r for r in rows if r["impl"] == "ours"]
    assert {r["tower"] for r in compared} == {"vision", "audio"}
    for row in compared:
        assert row["shapes_equal"] and row["max_rel_diff"] <= 1e-4, row
