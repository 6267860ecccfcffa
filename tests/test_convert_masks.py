import json

import numpy as np
import pytest
from PIL import Image

from training.datasets.convert_masks import convert, load_colors, main

COLORS = "training/datasets/colors/dubai_dev.json"


def test_dubai_colours_map_to_values_and_ignore(tmp_path):
    colors = load_colors(COLORS)
    rgb = np.array([[[60, 16, 152], [226, 169, 41]], [[155, 155, 155], [0, 0, 0]]], np.uint8)
    values, unknown = convert(rgb, colors)
    assert values.tolist() == [[1, 5], [0, 0]] and unknown == 0


def test_unknown_colour_is_an_error_unless_ignored(tmp_path):
    colors = load_colors(COLORS)
    rgb = np.array([[[60, 16, 152], [1, 2, 3]]], np.uint8)
    with pytest.raises(ValueError, match=r"\(1, 2, 3\)"):
        convert(rgb, colors)
    values, unknown = convert(rgb, colors, unknown="ignore")
    assert values.tolist() == [[1, 0]] and unknown == 1


def test_cli_converts_palette_pngs(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    pal = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), mode="P")
    pal.putpalette([110, 193, 228, 254, 221, 58] + [0] * 762)
    pal.save(src / "a.png")
    assert main(["--masks", str(src), "--colors", COLORS, "--out", str(out)]) == 0
    assert np.asarray(Image.open(out / "a.png")).tolist() == [[3, 4], [4, 3]]


def test_bad_colour_map_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"classes": {"a": {"rgb": [1, 2, 3], "value": 0}}, "ignore_value": 0}))
    (tmp_path / "m").mkdir()
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "m" / "x.png")
    assert main(["--masks", str(tmp_path / "m"), "--colors", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "distinct" in capsys.readouterr().err


def test_cli_regroups_value_masks_with_a_class_map(tmp_path):
    # GeoNRW values 0..10 -> the 5 appearance groups of geonrw_5.json (0 stays ignore).
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    Image.fromarray(np.array([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 1]], np.uint8)).save(src / "t.png")
    assert main(["--masks", str(src), "--classes", "training/datasets/classes/geonrw_5.json", "--out", str(out)]) == 0
    assert np.asarray(Image.open(out / "t.png")).tolist() == [[0, 1, 2, 3], [4, 3, 4, 5], [4, 5, 4, 1]]


def test_value_not_in_the_class_map_is_an_error(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(np.array([[1, 11]], np.uint8)).save(src / "t.png")
    assert main(["--masks", str(src), "--classes", "training/datasets/classes/geonrw_5.json",
                 "--out", str(tmp_path / "o")]) == 2
    assert "[11]" in capsys.readouterr().err
    assert not (tmp_path / "o" / "t.png").exists()


def test_class_map_refuses_colour_masks_and_colour_options(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(src / "t.png")
    args = ["--masks", str(src), "--classes", "training/datasets/classes/geonrw_5.json", "--out", str(tmp_path / "o")]
    assert main(args) == 2
    assert "3 bands" in capsys.readouterr().err
    assert main(args + ["--unknown", "ignore"]) == 2
    assert "--unknown" in capsys.readouterr().err
