"""The ``reid-ms`` command, run in-process on the bundled sample images with tiny models."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import reid_ms
from reid_ms.cli import main
from reid_ms.data import parse_market_name
from reid_ms.errors import InputError
from reid_ms.registry import get_spec

SAMPLE = reid_ms.sample_data().root

# Tiny ViT + dense neck at the sample images' own size (128x64), so the resize is the identity and the
# test can feed the model the decoded pixels itself.
TINY = dict(img_size=(128, 64), embed_dim=64, depth=2, num_heads=4, scales=(2, 4), camera_num=4)
TINY_ARGS = ["vit_b16_ms", "--img-size", "128", "64", "--camera-num", "4",
             "--set", "embed_dim=64", "--set", "depth=2", "--set", "num_heads=4", "--set", "scales=(2, 4)"]


def _run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _tiny_model(seed: int, backbone_state: dict | None = None) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = reid_ms.build("vit_b16_ms", **TINY)
    if backbone_state is not None:
        model.backbone.load_state_dict(backbone_state)
    return model.eval()


def _expected_features(model: torch.nn.Module, folder: Path) -> tuple[list[str], np.ndarray]:
    """Features computed here from the raw pixels: (x / 255 - 0.5) / 0.5, camera from the name."""
    files = sorted(folder.iterdir())
    images = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32))
                          .permute(2, 0, 1) for f in files])
    images = (images / 255.0 - 0.5) / 0.5
    cams = torch.tensor([int(re.search(r"_c(\d)", f.name).group(1)) - 1 for f in files])
    with torch.inference_mode():
        return [f.name for f in files], model(images, cam_label=cams).numpy()


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """Query and gallery features of the sample set, from a checkpoint written here."""
    root = tmp_path_factory.mktemp("extract")
    source = _tiny_model(seed=123)
    weights = root / "backbone.pth"
    torch.save(source.backbone.state_dict(), weights)
    outs = {}
    for split in ("query", "gallery"):
        outs[split] = root / f"{split}.npz"
        rc = main(["extract", *TINY_ARGS, "--weights", str(weights), "--images", str(SAMPLE / split),
                   "--out", str(outs[split]), "--batch-size", "8", "-q"])
        assert rc == 0
    return dict(root=root, weights=weights, backbone_state=source.backbone.state_dict(), **outs)


# -- data helpers --------------------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("0001_c1s1_000151_01.jpg", (1, 0)),
    ("1501_c6s4_001902_01.jpg", (1501, 5)),
    ("-1_c3s2_000123_02.jpg", (-1, 2)),
    ("0000_c2s1_000001_01.png", (0, 1)),
    ("0002_c002_00030600_0.jpg", (2, 1)),          # VeRi-style multi-digit camera
])
def test_parse_market_name(name, expected):
    assert parse_market_name(Path("/some/dir") / name) == expected


@pytest.mark.parametrize("name", ["img_001.jpg", "0001_s1_000151.jpg", "0001_c0s1_000151_01.jpg"])
def test_parse_market_name_rejects(name):
    with pytest.raises(InputError, match="Market-1501|start at 1"):
        parse_market_name(name)


def test_sample_data_layout():
    query, gallery = sorted((SAMPLE / "query").iterdir()), sorted((SAMPLE / "gallery").iterdir())
    assert len(query) == 7 and len(gallery) == 30
    gallery_pids = [parse_market_name(f)[0] for f in gallery]
    assert gallery_pids.count(-1) == 2 and gallery_pids.count(0) == 3
    assert sum(f.stat().st_size for f in query + gallery) < 1_000_000
    assert all(Image.open(f).size == (64, 128) for f in query + gallery)


# -- list / info ---------------------------------------------------------------------------------

def test_list(capsys):
    rc, out, _ = _run(capsys, "list")
    assert rc == 0
    assert out.split() == reid_ms.list_models()
    assert {"vit_b16", "vit_b16_ms", "clip_b16_ms_light", "clip_b16_adapt_ms"} <= set(out.split())


def test_info_hand_counted(capsys):
    rc, out, _ = _run(capsys, "info", "vit_b16", "--img-size", "64", "32", "--set", "embed_dim=64",
                      "--set", "depth=2", "--set", "num_heads=4")
    assert rc == 0
    # 64x32 at patch/stride 16: grid 4 x 2, T = 9 tokens of width D = 64.
    t, d = 9, 64
    patch = 2 * 8 * (3 * 16 * 16) * d                     # 8 patches, one 768 -> 64 projection each
    block = (2 * t * d * 3 * d                             # qkv
             + 2 * (2 * t * t * d)                         # Q K^T and A V over all heads
             + 2 * t * d * d                               # attention output projection
             + 2 * (2 * t * d * 4 * d))                    # MLP fc1 and fc2
    flops = patch + 2 * block
    assert "4 x 2 = 8 patches" in out
    assert f"({flops:,};" in out
    params = sum(p.numel() for p in reid_ms.build("vit_b16", img_size=(64, 32), embed_dim=64, depth=2,
                                                  num_heads=4).parameters())
    assert f"parameters   {params:,}" in out
    assert "neck         none" in out


def test_info_neck_and_adapter(capsys):
    rc, out, _ = _run(capsys, "info", "clip_b16_adapt_ms_light", "--img-size", "64", "32", "--stride", "12",
                      "--set", "width=64", "--set", "layers=1", "--set", "heads=4", "--set", "output_dim=32",
                      "--set", "adapt_dim=48", "--set", "scales=(2,)")
    assert rc == 0
    assert "(64 - 16) // 12 + 1" not in out and "5 x 2 = 10 patches" in out
    assert "32 wide; feature 48 wide" in out
    assert "light, scales (2,)" in out


TINY_SETS = {"vit": ["--set", "embed_dim=64", "--set", "depth=2", "--set", "num_heads=4"],
             "clip": ["--set", "width=64", "--set", "layers=2", "--set", "heads=4", "--set", "output_dim=32"]}


def _info(capsys, name: str, *extra: str) -> str:
    rc, out, err = _run(capsys, "info", name, "--img-size", "64", "32", *TINY_SETS[name.split("_")[0]],
                        *(["--set", "scales=(2,)"] if get_spec(name).neck_mode else []), *extra)
    assert rc == 0, err
    return out


@pytest.mark.parametrize("name", reid_ms.list_models())
def test_info_parts_add_up_to_the_total(name, capsys):
    out = _info(capsys, name)
    line = next(line for line in out.splitlines() if line.startswith("parameters"))
    total, parts = re.fullmatch(r"parameters\s+([\d,]+) \((.*)\)", line).groups()
    counts = {part.rsplit(" ", 1)[0]: int(part.rsplit(" ", 1)[1].replace(",", "")) for part in parts.split(", ")}
    assert sum(counts.values()) == int(total.replace(",", ""))
    if get_spec(name).model is reid_ms.JPMReIDModel:
        # two copies (b1, b2) of a ViT block of width 64 and its final LayerNorm
        vit = reid_ms.VitTrans(img_size=(64, 32), embed_dim=64, depth=1, num_heads=4)
        one = sum(p.numel() for p in vit.blocks[0].parameters()) + sum(p.numel() for p in vit.norm.parameters())
        assert counts["jpm branches"] == 2 * one
        assert "JigsawPatchNeck" in out and "global + 4 local branches x 64" in out
    else:
        assert "jpm branches" not in out


def test_info_multimodal_counts_every_modality(capsys):
    camera = ("--camera-num", "3")
    single = _info(capsys, "vit_b16_ms", *camera)
    fused = _info(capsys, "vit_b16_ms_rgbnt", *camera)
    flops = {key: int(re.search(r"\(([\d,]+); multiply", out).group(1).replace(",", ""))
             for key, out in (("single", single), ("fused", fused))}
    # the shared backbone and neck run once per modality; the BNNeck in eval mode is no matrix product
    assert flops["fused"] == 3 * flops["single"]
    assert "shared by rgb, nir, tir" in fused and "feature 192 wide (3 modalities x 64" in fused
    assert "per set of 3 images (rgb, nir, tir)" in fused


# -- extract / eval --------------------------------------------------------------------------------

@pytest.mark.parametrize("split", ["query", "gallery"])
def test_extract_matches_model(extracted, split):
    model = _tiny_model(seed=0, backbone_state=extracted["backbone_state"])   # neck/head: the CLI's seed 0
    names, expected = _expected_features(model, SAMPLE / split)
    with np.load(extracted[split], allow_pickle=False) as data:
        assert data["paths"].tolist() == names
        np.testing.assert_allclose(data["feats"], expected, atol=1e-5, rtol=1e-5)
        assert data["feats"].dtype == np.float32
        pids, cams = data["pids"].tolist(), data["camids"].tolist()
    umask = os.umask(0)
    os.umask(umask)
    assert extracted[split].stat().st_mode & 0o777 == 0o666 & ~umask   # not mkstemp's private 0600
    by_name = dict(zip(names, zip(pids, cams)))
    if split == "query":
        assert by_name["0001_c2s1_863178_01.jpg"] == (1, 1)
        assert by_name["0007_c3s1_352271_01.jpg"] == (7, 2)
    else:
        assert by_name["-1_c2s1_354973_01.jpg"] == (-1, 1)
        assert by_name["0006_c4s1_158790_01.jpg"] == (6, 3)


def test_extract_resumes_and_guards_settings(extracted, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    files = sorted((SAMPLE / "query").iterdir())
    for f in files[:3]:
        shutil.copy(f, images / f.name)
    out = tmp_path / "q.npz"
    base = ["extract", *TINY_ARGS, "--weights", extracted["weights"], "--images", images, "--out", out]
    assert _run(capsys, *base)[0] == 0
    # Mark the rows already done; a resumed run must keep them, not recompute them.
    with np.load(out, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["feats"][:] = 7.0
    np.savez(out, **arrays)
    for f in files[3:]:
        shutil.copy(f, images / f.name)
    rc, _, err = _run(capsys, *base)
    assert rc == 0 and "3 already extracted, 4 to go" in err
    with np.load(out, allow_pickle=False) as data, np.load(extracted["query"], allow_pickle=False) as full:
        assert data["paths"].tolist() == [f.name for f in files]
        np.testing.assert_array_equal(data["feats"][:3], 7.0)
        np.testing.assert_allclose(data["feats"][3:], full["feats"][3:], atol=1e-6)
        np.testing.assert_array_equal(data["pids"], full["pids"])

    rc, _, err = _run(capsys, *base, "--set", "neck_feat=after")
    assert rc == 2 and "other settings" in err and "build.neck_feat: None -> 'after'" in err
    with np.load(out, allow_pickle=False) as data:
        np.testing.assert_array_equal(data["feats"][:3], 7.0)       # the refused run left the file alone
    assert _run(capsys, *base, "--overwrite")[0] == 0
    with np.load(out, allow_pickle=False) as data, np.load(extracted["query"], allow_pickle=False) as full:
        np.testing.assert_allclose(data["feats"], full["feats"], atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "q.npz"]     # no temporary files left


def test_extract_interrupted_keeps_saved_batches(extracted, tmp_path, capsys, monkeypatch):
    import reid_ms.cli as cli

    calls = {"n": 0}
    real = cli._camera_labels

    def stop_at_third_batch(model, camids):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(model, camids)

    out = tmp_path / "q.npz"
    argv = ["extract", *TINY_ARGS, "--weights", extracted["weights"], "--images", SAMPLE / "query",
            "--out", out, "--batch-size", "2", "--save-every", "1"]
    monkeypatch.setattr(cli, "_camera_labels", stop_at_third_batch)
    with pytest.raises(KeyboardInterrupt):
        _run(capsys, *argv)
    with np.load(out, allow_pickle=False) as data:
        assert len(data["paths"]) == 4 and len(data["feats"]) == 4 and len(data["pids"]) == 4
    monkeypatch.setattr(cli, "_camera_labels", real)
    rc, _, err = _run(capsys, *argv)
    assert rc == 0 and "4 already extracted, 3 to go" in err
    with np.load(out, allow_pickle=False) as data, np.load(extracted["query"], allow_pickle=False) as full:
        np.testing.assert_allclose(data["feats"], full["feats"], atol=1e-6)
    assert [p.name for p in tmp_path.iterdir()] == ["q.npz"]


def _printed(out: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(Rank-\d+|mAP|mINP)\s+([\d.]+)%", out, re.M)}


def test_eval_from_files_and_from_folders(extracted, capsys):
    rc, out, err = _run(capsys, "eval", "--query-feats", extracted["query"], "--gallery-feats", extracted["gallery"])
    assert rc == 0
    assert "queries 6 valid of 7, gallery 28" in out          # query 7 has no cross-camera match; 2 junk out
    assert "ignoring 2 junk images" in err
    printed = _printed(out)
    assert set(printed) == {"Rank-1", "Rank-5", "Rank-10", "mAP", "mINP"}
    with np.load(extracted["query"]) as q, np.load(extracted["gallery"]) as g:
        keep = g["pids"] != -1
        ref = reid_ms.metrics.evaluate(q["feats"], g["feats"][keep], q["pids"], g["pids"][keep], q["camids"],
                                       g["camids"][keep])
    assert printed["mAP"] == pytest.approx(100 * ref.mAP, abs=0.006)
    assert printed["mINP"] == pytest.approx(100 * ref.mINP, abs=0.006)
    assert printed["Rank-5"] == pytest.approx(100 * float(ref.cmc[4]), abs=0.006)

    rc, out_dirs, _ = _run(capsys, "eval", *TINY_ARGS, "--weights", extracted["weights"],
                           "--query", SAMPLE / "query", "--gallery", SAMPLE / "gallery")
    assert rc == 0 and out_dirs == out


def test_eval_refuses_features_of_different_models(extracted, tmp_path, capsys):
    other = tmp_path / "gallery_random.npz"
    assert main(["extract", *TINY_ARGS, "--images", str(SAMPLE / "gallery"), "--out", str(other), "-q"]) == 0
    rc, _, err = _run(capsys, "eval", "--query-feats", extracted["query"], "--gallery-feats", other)
    assert rc == 2 and "different settings" in err and "weights_sha256" in err


# -- export ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, sets, width", [
    ("vit_b16_ms", {"embed_dim": 32, "depth": 1, "num_heads": 2}, 32),
    ("clip_b16_ms_rgbnt", {"width": 32, "layers": 1, "heads": 2, "output_dim": 16}, 3 * 16),  # rgb, nir, tir
])
def test_export_onnx_parity(name, sets, width, tmp_path, capsys):
    import onnxruntime

    out = tmp_path / "model.onnx"
    args = [name, "--img-size", "64", "32", "--camera-num", "3", "--set", "scales=(2,)", "--seed", "5",
            *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]
    rc, printed, _ = _run(capsys, "export", *args, "--out", out)
    images = ["rgb", "nir", "tir"] if get_spec(name).model is reid_ms.MultiModalReIDModel else ["images"]
    assert rc == 0 and f"inputs {', '.join(images)}, cam_label; output features [batch, {width}]" in printed
    assert "onnxruntime check" in printed
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [*images, "cam_label"]
    torch.manual_seed(5)
    model = reid_ms.build(name, img_size=(64, 32), camera_num=3, scales=(2,), **sets).eval()
    gen = torch.Generator().manual_seed(0)
    feeds = {n: torch.randn(5, 3, 64, 32, generator=gen) for n in images}    # another batch size than traced
    cams = torch.tensor([2, 0, 1, 1, 2])
    with torch.inference_mode():
        expected = model(feeds if len(images) > 1 else feeds["images"], cam_label=cams).numpy()
    got = session.run(None, {**{n: t.numpy() for n, t in feeds.items()}, "cam_label": cams.numpy()})[0]
    assert got.shape == (5, width)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert not np.allclose(got[0], got[3])       # the camera label reaches the graph


# -- errors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["extract", "vit_b16", "--weights", "{tmp}/missing.pth", "--images", str(SAMPLE / "query"),
      "--out", "{tmp}/x.npz"], "missing.pth' does not exist"),
    (["info", "vit_b16_mss"], "did you mean 'vit_b16_ms'"),
    (["info", "vit_b16", "--set", "depth"], "key=value"),
    (["info", "vit_b16", "--stride", "16", "--set", "stride_size=12"], "given twice"),
    (["extract", "vit_b16", "--images", "{tmp}/nowhere", "--out", "{tmp}/x.npz"], "does not exist"),
    (["eval", "--query-feats", "{tmp}/q.npz"], "go together"),
    (["eval"], "give either"),
    (["extract", "vit_b16_ms_rgbnt", "--images", str(SAMPLE / "query"), "--out", "{tmp}/x.npz"],
     "needs one image folder per modality"),
    (["eval", "clip_b16_ms_rgbnt", "--query", str(SAMPLE / "query"), "--gallery", str(SAMPLE / "gallery")],
     "needs one image folder per modality"),
    (["info", "vit_b16", "--set", "mlp_ratio=abc"], "--set mlp_ratio='abc': mlp_ratio of vit_b16 takes float"),
    (["info", "vit_b16", "--set", "sie_coef=abc", "--camera-num", "2"], "sie_coef of vit_b16 takes float"),
    (["info", "clip_b16", "--set", "sie_coef=abc", "--camera-num", "2"], "sie_coef of clip_b16 takes float"),
    (["info", "vit_b16_ms", "--set", "scales=(2.5,)"], "scales of vit_b16_ms takes Sequence[int]"),
    (["info", "vit_b16", "--set", "img_size=(100000, 100000)"], "for its weights alone"),
    (["info", "vit_b16_ms", "--set", "depth=100000"], "vit_b16_ms(depth=100000) needs more than"),
    (["info", "clip_b16_ms", "--set", "layers=100000"], "clip_b16_ms(layers=100000) needs more than"),
    (["info", "vit_b16", "--device", "nowhere"], "--device 'nowhere' is not a torch device"),
    (["eval", "--query-feats", "{tmp}/q.npz", "--gallery-feats", "{tmp}/g.npz", "--metric", "hamming"],
     "--metric must be one of cosine, euclidean"),
])
def test_errors_exit_2_with_one_line(argv, message, tmp_path, capsys):
    rc, out, err = _run(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert rc == 2
    lines = [line for line in err.splitlines() if line.startswith("reid-ms: error:")]
    assert len(lines) == 1 and message in lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "x.npz").exists()


# -- bad inputs: checked before anything is built ------------------------------------------------

@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if a command gets as far as building its model."""
    import reid_ms.cli as cli

    def refuse(args):
        raise AssertionError(f"{args.name} was built before the bad input was noticed")

    monkeypatch.setattr(cli, "_build_model", refuse)


def _one_error_line(capsys, *argv) -> str:
    rc, _, err = _run(capsys, *argv)
    lines = [line for line in err.splitlines() if line.startswith("reid-ms: error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_extract_out_under_a_file(tmp_path, capsys, no_model):
    (tmp_path / "file").write_text("not a folder")
    line = _one_error_line(capsys, "extract", *TINY_ARGS, "--images", SAMPLE / "query",
                           "--out", tmp_path / "file" / "q.npz")
    assert f"lies under '{tmp_path / 'file'}', which is a file" in line


@pytest.mark.parametrize("command, extra", [("export", []), ("extract", ["--images", SAMPLE / "query"])])
def test_out_is_a_folder(command, extra, tmp_path, capsys, no_model):
    line = _one_error_line(capsys, command, *TINY_ARGS, *extra, "--out", tmp_path)
    assert f"--out '{tmp_path}' is a folder; give a file name" in line


def _rewrite(path: Path, **changes) -> None:
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    arrays.update(changes)
    with open(path, "wb") as f:          # np.savez on a path would append .npz to a name without it
        np.savez(f, **arrays)


def test_resume_from_settings_that_are_not_json(extracted, tmp_path, capsys, no_model):
    out = tmp_path / "q.npz"
    shutil.copy(extracted["query"], out)
    _rewrite(out, settings=np.array("{'model': 'vit_b16_ms'"))
    line = _one_error_line(capsys, "extract", *TINY_ARGS, "--weights", extracted["weights"],
                           "--images", SAMPLE / "query", "--out", out)
    assert "its settings record is not JSON" in line and "--overwrite" in line


@pytest.mark.parametrize("change, message", [
    (lambda d: dict(pids=d["pids"][:-2]), "pids has shape (5,) for 7 rows of feats"),
    (lambda d: dict(camids=d["camids"][:, None]), "camids has shape (7, 1) for 7 rows of feats"),
    (lambda d: dict(feats=d["feats"].astype(np.int64)), "feats is int64 (7, 64), not [N, D] float"),
    (lambda d: dict(pids=d["pids"].astype(np.float32)), "pids holds float32, not integers"),
    (lambda d: dict(settings=np.array("[1, 2]")), "its settings record is list, not a JSON object"),
    (lambda d: dict(settings=np.array("null")), "its settings record is NoneType, not a JSON object"),
    (lambda d: dict(num_images=np.array([7, 7])), "num_images has shape (2,), not a single count"),
])
def test_eval_refuses_damaged_feature_files(extracted, tmp_path, capsys, change, message):
    query = tmp_path / "q.npz"
    shutil.copy(extracted["query"], query)
    with np.load(query, allow_pickle=False) as data:
        _rewrite(query, **change(data))
    line = _one_error_line(capsys, "eval", "--query-feats", query, "--gallery-feats", extracted["gallery"])
    assert f"{str(query)!r} is damaged or was not written by 'reid-ms extract'" in line and message in line


def test_eval_refuses_a_file_without_the_image_count(extracted, tmp_path, capsys):
    query = tmp_path / "q.npz"
    with np.load(extracted["query"], allow_pickle=False) as data:
        np.savez(query, **{k: data[k] for k in data.files if k != "num_images"})
    line = _one_error_line(capsys, "eval", "--query-feats", query, "--gallery-feats", extracted["gallery"])
    assert "lacks ['num_images']" in line


def test_a_late_failure_leaves_a_partial_file_that_eval_refuses(extracted, tmp_path, capsys):
    images = tmp_path / "images"
    shutil.copytree(SAMPLE / "query", images)
    (images / "9999_c1s1_000001_01.jpg").write_bytes(b"not a jpeg")        # sorts last: fails in the last batch
    out = tmp_path / "q.npz"
    line = _one_error_line(capsys, "extract", *TINY_ARGS, "--weights", extracted["weights"], "--images", images,
                           "--out", out, "--batch-size", "2", "--save-every", "1")
    assert "cannot read image" in line and "9999_c1s1_000001_01.jpg" in line
    with np.load(out, allow_pickle=False) as data:
        assert len(data["feats"]) == 6 and int(data["num_images"]) == 8
    line = _one_error_line(capsys, "eval", "--query-feats", out, "--gallery-feats", extracted["gallery"])
    assert f"{str(out)!r} holds 6 of the 8 images of its folder" in line and "run the same 'reid-ms extract'" in line
    # the same failure in an image-loading process: torch re-raises it with the worker's traceback appended
    line = _one_error_line(capsys, "extract", *TINY_ARGS, "--weights", extracted["weights"], "--images", images,
                           "--out", out, "--workers", "1")
    assert line.startswith("reid-ms: error: cannot read image") and "9999_c1s1_000001_01.jpg" in line
    assert "Traceback" not in line and "worker" not in line


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width x height`` RGB pixels and holds none (PIL checks the size on open)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [50_000, 10_000])      # PIL raises past twice its pixel limit and warns below
def test_decompression_bomb_image(side, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    (images / "0001_c1s1_000001_01.png").write_bytes(_png_header(side, side))
    assert side * side > Image.MAX_IMAGE_PIXELS
    line = _one_error_line(capsys, "extract", *TINY_ARGS, "--images", images, "--out", tmp_path / "q.npz")
    assert "refusing image" in line and "0001_c1s1_000001_01.png" in line and f"{side * side} pixels" in line
    assert "MAX_IMAGE_PIXELS" in line


def test_os_errors_end_in_one_line(capsys, monkeypatch):
    import reid_ms.cli as cli

    def unreadable(args):
        raise PermissionError(13, "Permission denied", "/data/query.npz")

    monkeypatch.setattr(cli, "_cmd_list", unreadable)
    line = _one_error_line(capsys, "list")
    assert line == "reid-ms: error: [Errno 13] Permission denied: '/data/query.npz'"


# -- memory bound of a model -----------------------------------------------------------------------

def _weight_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


@pytest.mark.parametrize("name, kwargs", [
    ("vit_b16_ms", dict(img_size=(64, 32), embed_dim=16, depth=2, num_heads=2, scales=(2,))),
    ("vit_b16_ms", dict(img_size=(64, 32), embed_dim=16, depth=40, num_heads=2, scales=(2,))),   # extrapolated
    ("clip_b16_adapt_ms", dict(img_size=(64, 32), width=16, layers=9, heads=2, output_dim=8, scales=(2,))),
])
def test_memory_bound_is_the_weights_size(name, kwargs, monkeypatch):
    import reid_ms.cli as cli

    exact = _weight_bytes(reid_ms.build(name, **kwargs))        # counted by hand on the real model
    monkeypatch.setattr(cli, "_memory_bytes", lambda device: exact)
    cli._check_model_fits(name, kwargs, "cpu")                   # fits exactly
    monkeypatch.setattr(cli, "_memory_bytes", lambda device: exact - 1)
    with pytest.raises(reid_ms.ConfigError, match="needs more than"):
        cli._check_model_fits(name, kwargs, "cpu")


@pytest.mark.parametrize("key, value, fits", [
    ("scales", (2, 4), True), ("scales", [3], True), ("scales", (2.5,), False), ("scales", 4, False),
    ("img_size", 64, True), ("img_size", (64, 32), True), ("img_size", "big", False),
    ("camera_num", 3, True), ("camera_num", True, False), ("camera_num", 3.0, False),
    ("mlp_ratio", 4, True), ("mlp_ratio", 4.5, True), ("mlp_ratio", "abc", False),
    ("mode", "light", True), ("mode", 1, False), ("qkv_bias", False, True), ("qkv_bias", 1, False),
    ("adapt_dim", 48, False),                                    # vit_b16_ms has no adapter: build says so
])
def test_set_values_are_checked_against_the_constructors(key, value, fits):
    import reid_ms.cli as cli

    if fits or key == "adapt_dim":
        cli._check_types("vit_b16_ms", {key: value})
    else:
        with pytest.raises(reid_ms.ConfigError, match=re.escape(f"--set {key}={value!r}: {key} of vit_b16_ms")):
            cli._check_types("vit_b16_ms", {key: value})
    if key == "adapt_dim":
        with pytest.raises(reid_ms.ConfigError, match="adapt_dim of clip_b16_adapt_ms takes int"):
            cli._check_types("clip_b16_adapt_ms", {key: "wide"})


# -- startup ---------------------------------------------------------------------------------------

def _fresh_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(reid_ms.__file__).parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["list"], ["extract", "--help"]])
def test_quick_commands_do_not_import_torch(argv):
    # what makes them answer in well under a second: torch and the model code are never imported
    code = ("import sys\nfrom reid_ms.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'numpy', 'timm', 'open_clip', 'PIL') if m in sys.modules))" % argv)
    done = _fresh_python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"
    if argv == ["list"]:
        assert done.stdout.split()[:-1] == reid_ms.list_models()


def test_python_dash_m():
    done = subprocess.run([sys.executable, "-m", "reid_ms", "--version"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(reid_ms.__file__).parents[1])}, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == f"reid-ms {reid_ms.__version__}"


def test_lazy_package_exports():
    # every public name resolves to the object of the module _LAZY names, which the TYPE_CHECKING imports agree with
    import ast
    import importlib

    source = Path(reid_ms.__file__).read_text()
    checked = next(node for node in ast.walk(ast.parse(source))
                   if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test))
    imported = {alias.name: node.module for node in checked.body if isinstance(node, ast.ImportFrom) and node.module
                != "reid_ms" for alias in node.names}
    assert imported == reid_ms._LAZY
    for name, module in reid_ms._LAZY.items():
        assert getattr(reid_ms, name) is getattr(importlib.import_module(module), name)
    assert set(reid_ms._LAZY) | {"metrics"} <= set(reid_ms.__all__)
    with pytest.raises(AttributeError, match="has no attribute 'VitTrnas'"):
        reid_ms.VitTrnas


def test_train_choices_are_the_training_modules():
    # the parser spells them out so that --help needs no torch; they must stay the training module's
    from reid_ms import cli, training

    assert set(cli.TRAIN_DATASETS) == set(training.DATASETS)
    assert set(cli.TRAIN_RECIPES) == set(training.RECIPES)
    assert set(cli.TRAIN_AMP) == set(training.AMP_DTYPES)
