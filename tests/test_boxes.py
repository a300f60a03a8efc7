"""Parsing and drawing Gemma's detection / pointing JSON."""

from __future__ import annotations

import pytest
from PIL import Image

from mlx_gemma4.boxes import Box, draw_boxes, parse_boxes

SIZE = (800, 400)  # width, height: non-square, so swapped x / y would show


def test_unfenced_single_box_maps_to_pixels():
    [box] = parse_boxes('{"box_2d": [100, 250, 500, 750], "label": "cat"}', SIZE)
    # [y0, x0, y1, x1] in 0-1000 -> x over the width (800), y over the height (400)
    assert box == Box("cat", 200.0, 40.0, 600.0, 200.0)


def test_fenced_list_with_trailing_text():
    text = ('Sure! Here they are:\n```json\n[\n  {"box_2d": [0, 0, 1000, 1000], "label": "table"},\n'
            '  {"box_2d": [500, 500, 600, 700], "label": "cup [blue]"}\n]\n```\nLet me know if you need more.')
    boxes = parse_boxes(text, SIZE)
    assert [b.label for b in boxes] == ["table", "cup [blue]"]
    assert (boxes[0].x0, boxes[0].y0, boxes[0].x1, boxes[0].y1) == (0, 0, 800, 400)
    assert (boxes[1].x0, boxes[1].y0, boxes[1].x1, boxes[1].y1) == (400, 200, 560, 240)


def test_trailing_text_without_fence_and_several_boxes():
    text = '[{"box_2d": [1, 2, 3, 4], "label": "a"}, {"box_2d": [5, 6, 7, 8], "label": "b"}] The end {not json'
    assert [b.label for b in parse_boxes(text, SIZE)] == ["a", "b"]


def test_single_quotes_trailing_commas_and_apostrophes():
    text = "[{'box_2d': [10, 20, 30, 40], 'label': \"person's hat\",}, {'box_2d': [50, 60, 70, 80], 'label': 'dog',},]"
    boxes = parse_boxes(text, SIZE)
    assert [b.label for b in boxes] == ["person's hat", "dog"]
    assert boxes[1].x0 == pytest.approx(60 / 1000 * 800)


def test_points_and_out_of_order_or_out_of_range_coordinates():
    text = ('[{"point_2d": [250, 500], "label": "nose"}, {"point": [1000, 0], "label": "corner"},'
            ' {"box_2d": [600, 900, 200, 1200], "label": "flipped"}]')
    nose, corner, flipped = parse_boxes(text, SIZE)
    assert nose.is_point and (nose.x0, nose.y0) == (400, 100) and (nose.x1, nose.y1) == (400, 100)
    assert (corner.x0, corner.y0) == (0, 400)
    assert (flipped.x0, flipped.y0, flipped.x1, flipped.y1) == (720, 80, 800, 240)


@pytest.mark.parametrize("text", [
    "", "no boxes here", "```json\n[{\"box_2d\": [1, 2, 3], \"label\": \"short\"}]\n```", "{{{[[[", "[1, 2, 3]",
    '{"box_2d": "not a list", "label": "x"}', '[{"box_2d": [1, 2, "three", 4]}]', "```json\n{broken: \n```",
])
def test_bad_json_gives_no_boxes(text):
    assert parse_boxes(text, SIZE) == []


def test_truncated_answer_keeps_complete_boxes():
    text = '[{"box_2d": [100, 100, 200, 200], "label": "done"}, {"box_2d": [300, 3'
    assert [b.label for b in parse_boxes(text, SIZE)] == ["done"]


def test_draw_boxes_keeps_size_and_marks_pixels():
    image = Image.new("RGB", SIZE, "white")
    boxes = parse_boxes('[{"box_2d": [100, 100, 900, 900], "label": "thing"}, {"point_2d": [500, 500]}]', SIZE)
    out = draw_boxes(image, boxes)
    assert out.size == SIZE and out.mode == "RGB"
    assert image.getpixel((80, 200)) == (255, 255, 255)  # the input is untouched
    assert out.getpixel((80, 200)) != (255, 255, 255)  # left edge of the box
    assert out.getpixel((400, 200)) != (255, 255, 255)  # the point
    assert out.getpixel((300, 300)) == (255, 255, 255)  # inside the box, away from the label
    assert draw_boxes(Image.new("L", (10, 20)), []).size == (10, 20)


class _TooMuchWork(Exception):
    pass


def _lines_run(text: str, limit: int) -> int:
    """Lines of mlx_gemma4/boxes.py that parse_boxes(text) executes (a measure of work that no clock skews);
    stops at `limit` so a quadratic parser fails fast instead of running for minutes."""
    import sys

    import mlx_gemma4.boxes as boxes

    count = 0

    def local(frame, event, arg):
        nonlocal count
        if event == "line":
            count += 1
            if count > limit:
                raise _TooMuchWork
        return local

    def tracer(frame, event, arg):
        return local if frame.f_code.co_filename == boxes.__file__ else None

    sys.settrace(tracer)
    try:
        parse_boxes(text, SIZE)
    except _TooMuchWork:
        pass
    finally:
        sys.settrace(None)
    return count


@pytest.mark.parametrize("unit", ["[", "{", "[{", '["', "'[", '["\\"', "[a]", '{"box_2d": [1, 2, '])
def test_parsing_is_linear_in_the_answer(unit):
    short, long = unit * (2000 // len(unit)), unit * (8000 // len(unit))
    budget = 400 * len(long)  # the old parser ran ~len**2 / 2 scan steps (32,000,000 here), ~8 lines each
    n_short, n_long = _lines_run(short, budget), _lines_run(long, budget)
    assert n_long < budget, f"{n_long} lines for {len(long)} characters"
    assert n_long < 6 * n_short  # four times the text, about four times the work


def test_deep_nesting_is_no_error():
    assert parse_boxes("[" * 5000 + "]" * 5000, SIZE) == []
    assert parse_boxes("{[1, 2]}", SIZE) == []  # a Python set of a list: unhashable, not a crash


def _exif_rotated_photo(path):
    """An 8x4 picture stored sideways with EXIF orientation 6: it displays (and the model sees it) as 4x8."""
    stored = Image.new("RGB", (8, 4), "white")
    exif = stored.getexif()
    exif[0x0112] = 6
    stored.save(path, exif=exif)
    return path


def test_draw_boxes_on_a_path_uses_the_orientation_the_model_sees(tmp_path):
    from mlx_gemma4.processing.image import load_image

    path = _exif_rotated_photo(tmp_path / "portrait.jpg")
    seen = load_image(path)
    assert seen.size == (4, 8)
    out = draw_boxes(path, parse_boxes('{"point_2d": [500, 500]}', seen.size))
    assert out.size == (4, 8)


def test_app_annotate_draws_on_the_rotated_image(tmp_path):
    from app.boxes import annotate

    path = _exif_rotated_photo(tmp_path / "portrait.jpg")
    out = annotate('[{"box_2d": [0, 0, 1000, 1000], "label": ""}]', path, tmp_path / "out")
    assert Image.open(out).size == (4, 8)
    assert annotate("no boxes here", path, tmp_path / "out") is None


def test_unusable_images_are_input_errors(bomb_png, tmp_path):
    from app.boxes import annotate
    from mlx_gemma4.errors import InputError

    answer = '{"box_2d": [0, 0, 10, 10]}'
    with pytest.raises(InputError, match="too large"):
        annotate(answer, bomb_png, tmp_path)
    with pytest.raises(InputError, match="too large"):
        draw_boxes(bomb_png, [])
    closed = Image.new("RGB", (4, 4))
    closed.close()
    with pytest.raises(InputError, match="closed"):
        draw_boxes(closed, [])


@pytest.mark.parametrize("size", [None, "cat.jpg", (800,), (0, 400), (800, "400"), (True, 400)])
def test_an_image_size_that_is_not_width_and_height_is_an_input_error(size):
    """parse_boxes(text, None) was a TypeError from inside, (text, 'cat.jpg') a ValueError."""
    from mlx_gemma4 import InputError

    with pytest.raises(InputError, match=r"image_size must be the image's \(width, height\)"):
        parse_boxes('{"box_2d": [0, 0, 500, 500]}', size)
    assert parse_boxes('{"box_2d": [0, 0, 500, 500]}', [800, 400]) == parse_boxes('{"box_2d": [0, 0, 500, 500]}', SIZE)
