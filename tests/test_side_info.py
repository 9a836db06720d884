"""Camera/view (SIE) row lookup shared by both backbones."""

from __future__ import annotations

import pytest
import torch

from reid_ms.backbones._common import grid_size, pair, side_info_index, side_info_rows
from reid_ms.errors import ConfigError, InputError

CPU = torch.device("cpu")


@pytest.mark.parametrize("cams,views,rows", [(0, 0, 0), (6, 0, 6), (0, 4, 4), (6, 4, 24), (1, 1, 1)])
def test_rows(cams, views, rows):
    assert side_info_rows(cams, views) == rows


def test_row_is_cam_times_views_plus_view():
    cam = torch.tensor([0, 1, 5, 2])
    view = torch.tensor([3, 0, 1, 2])
    rows = side_info_index(cam, view, 6, 4, 4, CPU, "m")
    assert rows.tolist() == [0 * 4 + 3, 1 * 4 + 0, 5 * 4 + 1, 2 * 4 + 2]
    assert side_info_index(cam, None, 6, 0, 4, CPU, "m").tolist() == cam.tolist()
    assert side_info_index(None, view, 0, 4, 4, CPU, "m").tolist() == view.tolist()
    assert side_info_index(None, None, 0, 0, 4, CPU, "m") is None


def test_label_forms():
    assert side_info_index(2, None, 6, 0, 3, CPU, "m").tolist() == [2, 2, 2]
    assert side_info_index([1, 0, 5], None, 6, 0, 3, CPU, "m").tolist() == [1, 0, 5]
    assert side_info_index(torch.tensor(4), None, 6, 0, 2, CPU, "m").tolist() == [4, 4]
    assert side_info_index(torch.tensor([1, 2], dtype=torch.int32), None, 6, 0, 2, CPU, "m").dtype == torch.long


@pytest.mark.parametrize(
    "cam,view,cams,views,match",
    [
        (None, None, 6, 0, "needs cam_label"),
        (torch.tensor([0, 1]), None, 6, 4, "needs view_label"),
        (torch.tensor([0, 6]), None, 6, 0, r"\[0, 5\].*6"),
        (torch.tensor([-1, 0]), None, 6, 0, "from -1"),
        (None, torch.tensor([0, 4]), 0, 4, "view_num=4"),
        (torch.tensor([0.0, 1.0]), None, 6, 0, "integer"),
        (torch.tensor([True, False]), None, 6, 0, "integer"),
        (torch.tensor([0, 1, 2]), None, 6, 0, "one label per image"),
        (torch.tensor([[0, 1]]), None, 6, 0, "one label per image"),
        ("1", None, 6, 0, "must be an int"),
        (torch.tensor([0, 1]), None, 0, 0, "camera_num=0"),
        (torch.tensor([0, 1]), torch.tensor([0, 1]), 6, 0, "view_num=0"),
    ],
)
def test_label_errors(cam, view, cams, views, match):
    with pytest.raises(InputError, match=match):
        side_info_index(cam, view, cams, views, 2, CPU, "m")


def test_grid_and_pair():
    assert grid_size((256, 128), (16, 16), (16, 16)) == (16, 8)
    assert grid_size((256, 128), (16, 16), (12, 12)) == (21, 10)
    assert grid_size((384, 128), (16, 16), (16, 16)) == (24, 8)
    assert pair(16, "x") == (16, 16) and pair((3, 4), "x") == (3, 4)
    with pytest.raises(ConfigError, match="img_size"):
        pair((1, 2, 3), "img_size")
    with pytest.raises(ConfigError, match="smaller than patch_size"):
        grid_size((8, 8), (16, 16), (16, 16))
    with pytest.raises(ConfigError):
        side_info_rows(-1, 0)
