"""reid_ms.data.load_dataset on tiny trees in each published layout, written by the tests."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from reid_ms import data
from reid_ms.data import ReidSample, load_dataset
from reid_ms.errors import InputError


def _img(path: Path, value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 8), (value, value, value)).save(path)
    return path


def _market_tree(root: Path, names: dict[str, list[str]]) -> Path:
    for folder, files in names.items():
        for name in files:
            _img(root / folder / name)
    return root


MARKET = {
    "bounding_box_train": ["0002_c1s1_000451_03.jpg", "0007_c2s3_070952_01.jpg", "0002_c6s1_000101_01.jpg",
                           "1500_c3s1_000003_02.jpg", "-1_c1s1_000001_00.jpg"],
    "query": ["0001_c1s1_001051_00.jpg", "0003_c5s1_000001_00.jpg"],
    "bounding_box_test": ["0001_c2s1_000301_01.jpg", "0000_c1s1_000009_02.jpg", "-1_c3s1_000011_04.jpg",
                          "0003_c4s1_000201_01.jpg"],
}


@pytest.mark.parametrize("name", ["market1501", "dukemtmc", "occ_duke", "folder"])
def test_market_layouts(tmp_path, name):
    root = _market_tree(tmp_path / "set", MARKET)
    ds = load_dataset(name, root)
    # junk dropped, ids relabelled in sorted order (2 -> 0, 7 -> 1, 1500 -> 2), cameras 0-based, views 0
    train = sorted((s.path.name, s.pid, s.camid, s.viewid) for s in ds.train)
    assert train == [("0002_c1s1_000451_03.jpg", 0, 0, 0), ("0002_c6s1_000101_01.jpg", 0, 5, 0),
                     ("0007_c2s3_070952_01.jpg", 1, 1, 0), ("1500_c3s1_000003_02.jpg", 2, 2, 0)]
    assert sorted((s.pid, s.camid) for s in ds.query) == [(1, 0), (3, 4)]
    # distractors (person 0) stay in the gallery; junk goes
    assert sorted((s.pid, s.camid) for s in ds.gallery) == [(0, 0), (1, 1), (3, 3)]
    assert (ds.num_train_pids, ds.num_train_cams, ds.num_train_views) == (3, 6, 1)
    assert all(isinstance(s, ReidSample) and s.path.is_file() for s in ds.train + ds.query + ds.gallery)


def test_root_may_hold_the_data_set_under_its_usual_name(tmp_path):
    _market_tree(tmp_path / "Market-1501-v15.09.15", MARKET)
    assert load_dataset("market1501", tmp_path).root == tmp_path / "Market-1501-v15.09.15"
    _market_tree(tmp_path / "DukeMTMC-reID", MARKET)
    assert load_dataset("dukemtmc", tmp_path).root == tmp_path / "DukeMTMC-reID"


def test_market_malformed(tmp_path):
    with pytest.raises(InputError, match="bounding_box_train"):
        load_dataset("market1501", tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        load_dataset("market1501", tmp_path / "nowhere")
    root = _market_tree(tmp_path / "a", {"bounding_box_train": MARKET["bounding_box_train"], "query": MARKET["query"]})
    with pytest.raises(InputError, match="bounding_box_test"):
        load_dataset("market1501", root)
    root = _market_tree(tmp_path / "b", {**MARKET, "query": ["0001_c7s1_001051_00.jpg"]})
    with pytest.raises(InputError, match="cameras 1-6"):
        load_dataset("market1501", root)
    assert load_dataset("dukemtmc", root).query[0].camid == 6     # Duke has 8 cameras
    root = _market_tree(tmp_path / "d", {**MARKET, "query": ["0001_c12s1_001051_00.jpg"]})
    assert load_dataset("folder", root).query[0].camid == 11       # a generic tree: any camera
    root = _market_tree(tmp_path / "e", {**MARKET, "query": ["0001_c0s1_001051_00.jpg"]})
    with pytest.raises(InputError, match="start at 1"):
        load_dataset("folder", root)
    root = _market_tree(tmp_path / "f", {**MARKET, "query": ["-1_c1s1_001051_00.jpg"]})
    with pytest.raises(InputError, match="no usable image"):
        load_dataset("market1501", root)
    root = _market_tree(tmp_path / "c", {**MARKET, "query": ["person1.jpg"]})
    with pytest.raises(InputError, match="person1.jpg"):
        load_dataset("market1501", root)
    with pytest.raises(InputError, match="unknown data set"):
        load_dataset("market", root)


def _msmt_tree(root: Path) -> Path:
    lists = {
        "list_train.txt": ("train", ["0000/0000_000_01_0303morning_0015_0.jpg 0", "0000/0000_001_05_0303morning_0016_0.jpg 0",
                                     "0003/0003_000_15_0303noon_0100_1.jpg 3"]),
        "list_val.txt": ("train", ["0001/0001_000_02_0303afternoon_0015_0.jpg 1"]),
        "list_query.txt": ("test", ["0000/0000_000_03_0303morning_0015_0.jpg 0"]),
        "list_gallery.txt": ("test", ["0000/0000_000_04_0303morning_0015_0.jpg 0",
                                      "0002/0002_001_12_0303morning_0015_0.jpg 2", ""]),
    }
    for list_name, (folder, lines) in lists.items():
        for line in lines:
            if line:
                _img(root / folder / line.split()[0])
        (root / list_name).write_text("\n".join(lines) + "\n")
    return root


def test_msmt17(tmp_path):
    root = _msmt_tree(tmp_path / "MSMT17")
    ds = load_dataset("msmt17", tmp_path)
    # list_train + list_val, ids 0, 1, 3 -> 0, 1, 2; camera from the third field of the name
    assert sorted((s.path.name, s.pid, s.camid) for s in ds.train) == [
        ("0000_000_01_0303morning_0015_0.jpg", 0, 0), ("0000_001_05_0303morning_0016_0.jpg", 0, 4),
        ("0001_000_02_0303afternoon_0015_0.jpg", 1, 1), ("0003_000_15_0303noon_0100_1.jpg", 2, 14)]
    assert [(s.pid, s.camid) for s in ds.gallery] == [(0, 3), (2, 11)]
    assert ds.query[0].path == root / "test" / "0000" / "0000_000_03_0303morning_0015_0.jpg"
    assert (ds.num_train_pids, ds.num_train_cams) == (3, 15)


def test_msmt17_malformed(tmp_path):
    root = _msmt_tree(tmp_path / "m")
    (root / "list_val.txt").unlink()
    with pytest.raises(InputError, match="list_val.txt"):
        load_dataset("msmt17", root)
    root = _msmt_tree(tmp_path / "n")
    (root / "list_query.txt").write_text("0000/0000_000_03_0303morning_0015_0.jpg\n")
    with pytest.raises(InputError, match=r"list_query.txt:1"):
        load_dataset("msmt17", root)
    root = _msmt_tree(tmp_path / "o")
    (root / "list_query.txt").write_text("0009/0009_000_03_0303morning_0015_0.jpg 9\n")
    with pytest.raises(InputError, match="does not exist"):
        load_dataset("msmt17", root)


VERI = {
    "image_train": ["0001_c001_00016450_0.jpg", "0001_c002_00016455_0.jpg", "0004_c020_00001234_1.jpg"],
    "image_query": ["0002_c002_00030600_0.jpg"],
    "image_test": ["0002_c003_00084280_0.jpg", "0005_c005_00077490_0.jpg"],
}


def test_veri_without_keypoints(tmp_path):
    root = _market_tree(tmp_path / "VeRi", VERI)
    ds = load_dataset("veri", root)
    assert sorted((s.pid, s.camid, s.viewid) for s in ds.train) == [(0, 0, 0), (0, 1, 0), (1, 19, 0)]
    assert (ds.num_train_cams, ds.num_train_views) == (20, 1)


def test_veri_keypoint_views(tmp_path, caplog):
    root = _market_tree(tmp_path / "VeRi", VERI)
    kp = " ".join(["10"] * 40)
    (root / "keypoint_train.txt").write_text(
        f"VeRi/image_train/0001_c001_00016450_0.jpg {kp} 3\nVeRi/image_train/0004_c020_00001234_1.jpg {kp} 7\n")
    (root / "keypoint_test.txt").write_text(
        f"VeRi/image_query/0002_c002_00030600_0.jpg {kp} 1\nVeRi/image_test/0002_c003_00084280_0.jpg {kp} 0\n"
        f"VeRi/image_test/0005_c005_00077490_0.jpg {kp} 5\n"
        f"VeRi/image_train/0001_c001_00016450_0.jpg {kp} 6\n")   # the training file's view wins
    with caplog.at_level(logging.WARNING, logger="reid_ms.data.datasets"):
        ds = load_dataset("veri", tmp_path)
    # 0001_c002 has no viewpoint: left out, as TransReID does, and said so
    assert sorted((s.path.name, s.pid, s.viewid) for s in ds.train) == [
        ("0001_c001_00016450_0.jpg", 0, 3), ("0004_c020_00001234_1.jpg", 1, 7)]
    assert "1 images" in caplog.text and "image_train" in caplog.text
    assert [s.viewid for s in ds.query] == [1] and sorted(s.viewid for s in ds.gallery) == [0, 5]
    assert ds.num_train_views == 8
    (root / "keypoint_test.txt").unlink()
    with pytest.raises(InputError, match="keypoint_test.txt"):
        load_dataset("veri", root)
    (root / "keypoint_test.txt").write_text("VeRi/image_test/x.jpg 1 2 front\n")
    with pytest.raises(InputError, match=r"keypoint_test.txt:1"):
        load_dataset("veri", root)


def _rgbnt_tree(root: Path, skip: str | None = None) -> Path:
    files = {"train_171": ["000001_cam1_0_00.jpg", "000001_cam3_1_00.jpg", "000009_cam4_0_05.jpg"],
             "test": ["000200_cam2_0_00.jpg", "000200_cam4_2_01.jpg"]}
    for split, names in files.items():
        for value, folder in enumerate(("RGB", "NI", "TI")):
            for name in names:
                if f"{split}/{folder}/{name}" != skip:
                    _img(root / split / folder / name, value * 100)
    return root


def test_rgbnt201(tmp_path):
    root = _rgbnt_tree(tmp_path / "RGBNT201")
    ds = load_dataset("rgbnt201", tmp_path)
    assert ds.modalities == ("rgb", "nir", "tir")
    assert sorted((s.pid, s.camid) for s in ds.train) == [(0, 0), (0, 2), (1, 3)]
    first = ds.train[0].path
    assert set(first) == {"rgb", "nir", "tir"}
    assert first["nir"] == root / "train_171" / "NI" / first["rgb"].name
    assert first["tir"] == root / "train_171" / "TI" / first["rgb"].name
    assert [(s.pid, s.camid) for s in ds.query] == [(200, 1), (200, 3)] == [(s.pid, s.camid) for s in ds.gallery]
    # the training items carry one tensor per modality
    image, pid, camid, viewid = data.ImageDataset(ds.train, data.eval_transform((8, 4)))[0]
    assert set(image) == {"rgb", "nir", "tir"} and image["rgb"].shape == (3, 8, 4)
    assert image["rgb"].mean() < image["nir"].mean() < image["tir"].mean()
    assert (pid, camid, viewid) == (0, 0, 0)


def test_rgbnt201_malformed(tmp_path):
    _rgbnt_tree(tmp_path / "a", skip="train_171/TI/000009_cam4_0_05.jpg")
    with pytest.raises(InputError, match=r"TI/000009_cam4_0_05.jpg"):
        load_dataset("rgbnt201", tmp_path / "a")
    root = _rgbnt_tree(tmp_path / "b")
    for f in (root / "test" / "NI").iterdir():
        f.unlink()
    (root / "test" / "NI").rmdir()
    with pytest.raises(InputError, match=r"test/NI"):
        load_dataset("rgbnt201", root)


def test_image_dataset_items(tmp_path):
    ds = load_dataset("market1501", _market_tree(tmp_path / "m", MARKET))
    items = data.ImageDataset(ds.train, data.train_transform((16, 8), padding=2))
    loader = torch.utils.data.DataLoader(items, batch_size=4)
    images, pids, camids, viewids = next(iter(loader))
    assert images.shape == (4, 3, 16, 8) and images.dtype == torch.float32
    assert pids.tolist() == [s.pid for s in ds.train] and camids.tolist() == [s.camid for s in ds.train]
    assert viewids.tolist() == [0, 0, 0, 0]
    (tmp_path / "m" / "bounding_box_train" / "0007_c2s3_070952_01.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(InputError, match="0007_c2s3_070952_01.jpg"):
        [items[i] for i in range(len(items))]
