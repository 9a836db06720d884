"""Every script in ``examples/`` runs in a fresh interpreter at its tiny size and prints what it promises."""

from __future__ import annotations

import importlib.util
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import reid_ms
from reid_ms.cli import main as reid_ms_main
from reid_ms.registry import get_spec

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SAMPLE = reid_ms.sample_data().root
TESTED = {"quickstart.py", "extract_features.py", "load_transreid_checkpoint.py", "clip_multiscale.py",
          "make_sample_data.py"}


def _transreid_checkpoint(path: Path) -> None:
    """TransReID's layout written by hand: a tiny ViT trained without SIE, BNNeck, 10 identities."""
    vit = reid_ms.VitTrans(img_size=(128, 64), stride_size=16, embed_dim=64, depth=2, num_heads=4)
    state = {f"base.{k}": v for k, v in vit.state_dict().items()}
    state.update({"bottleneck.weight": torch.ones(64), "bottleneck.bias": torch.zeros(64),
                  "bottleneck.running_mean": torch.zeros(64), "bottleneck.running_var": torch.ones(64),
                  "bottleneck.num_batches_tracked": torch.tensor(0), "classifier.weight": torch.zeros(10, 64)})
    torch.save(state, path)


def _openai_checkpoint(path: Path) -> None:
    """An OpenAI-layout state dict (``visual.`` prefix, fp16) of a tiny CLIP at 224x224 (14 x 14 positions)."""
    clip = reid_ms.ClipVisual(img_size=(224, 224), width=64, layers=2, heads=4, output_dim=32)
    torch.save({f"visual.{k}": v.half() for k, v in clip.state_dict().items()}, path)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, str]:
    """stdout of every example run, started together (each is mostly interpreter and torch start-up)."""
    tmp = tmp_path_factory.mktemp("examples")
    _transreid_checkpoint(tmp / "transformer_120.pth")
    _openai_checkpoint(tmp / "ViT-B-16-tiny.pt")
    runs = {
        "quickstart": ["quickstart.py", "--tiny", "--backbone", "clip", "--camera-num", "3", "--batch", "2",
                       "--iters", "1"],
        "extract": ["extract_features.py", "--tiny", "--camera-num", "4", "--batch-size", "5"],
        "transreid_stand_in": ["load_transreid_checkpoint.py", "--tiny"],
        "transreid_given": ["load_transreid_checkpoint.py", "--tiny", "--checkpoint", tmp / "transformer_120.pth",
                            "--stride", "16", "--camera-num", "0", "--num-classes", "10", "--model",
                            "vit_b16_ms_light", "--neck-feat", "after"],
        "clip": ["clip_multiscale.py", "--tiny", "--camera-num", "3", "--batch", "2", "--checkpoint",
                 tmp / "ViT-B-16-tiny.pt"],
        "sample_data": ["make_sample_data.py", "--out", tmp / "sample_data"],
    }
    procs = {key: subprocess.Popen([sys.executable, str(EXAMPLES / args[0]), *map(str, args[1:])],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for key, args in runs.items()}
    results = {}
    for key, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{' '.join(map(str, runs[key]))} failed:\n{out}\n{err}"
        results[key] = out
    results["tmp"] = str(tmp)
    return results


def _percent(out: str, label: str) -> float:
    return float(re.search(rf"^{re.escape(label)}\s+([\d.]+)%", out, re.M).group(1))


def test_every_example_is_run_by_a_test():
    # the scripts run here, plus any another test file runs by name (e.g. a torchrun example)
    others = " ".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py") if p.name != Path(__file__).name)
    untested = [p.name for p in EXAMPLES.glob("*.py") if p.name not in TESTED and p.name not in others]
    assert not untested, f"examples no test runs: {untested}"


def test_quickstart(outputs):
    out = outputs["quickstart"]
    assert "tokens        [2, 129, 32]" in out            # 256x128 at stride 16: 16 x 8 patches + CLS
    assert "grid          16 x 8 = 128 patches" in out and "images/s" in out


def test_extract_features_matches_the_command(outputs, capsys):
    out = outputs["extract"]
    assert "query     7 images (0 junk dropped) -> features [7, 64]" in out
    assert "gallery   30 images (2 junk dropped) -> features [28, 64]" in out
    assert "queries   6 of 7" in out
    # the same tiny model and seed through `reid-ms eval` must score the same: both are the library's
    # build + transform + camera labels + metrics, reached two ways
    rc = reid_ms_main(["eval", "vit_b16_ms", "--img-size", "128", "64", "--camera-num", "4", "--set", "embed_dim=64",
                       "--set", "depth=2", "--set", "num_heads=4", "--seed", "0", "--query", str(SAMPLE / "query"),
                       "--gallery", str(SAMPLE / "gallery"), "-q"])
    command = capsys.readouterr().out
    assert rc == 0
    for label in ("Rank-1", "Rank-5", "mAP"):
        assert _percent(out, label) == pytest.approx(_percent(command, label), abs=0.006)


def test_load_transreid_stand_in(outputs):
    out = outputs["transreid_stand_in"]
    assert "STAND-IN checkpoint in TransReID's layout" in out
    assert "the load refuses" in out and "build it with camera_num=6" in out
    assert "transreid checkpoint (torch.save); loaded 37 tensors" in out    # 2 blocks: 2 + 2*12 + 4 + table
    assert "base.fc.weight (TransReID's unused classifier" in out
    assert "trained head: head.bottleneck.weight" in out and "head.classifier.weight" in out
    assert "features [7, 64] (before the BNNeck)" in out and "cameras [0, 1, 2]" in out


def test_load_transreid_given_checkpoint(outputs):
    out = outputs["transreid_given"]
    assert "STAND-IN" not in out
    assert "transformer_120.pth: transreid checkpoint (torch.save); loaded 36 tensors" in out
    assert "features [7, 64] (after the BNNeck)" in out and "cameras" not in out


def test_clip_multiscale_widths_and_checkpoint(outputs):
    out = outputs["clip"]
    assert "ViT-B-16-tiny.pt: openai" in out and "resized" in out      # 14 x 14 positions -> 8 x 4
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("clip_b16")}
    # model, inside, out, neck width, adapter params, neck params, embedding...
    assert rows["clip_b16_ms"][1:4] == ["64", "32", "32"] and rows["clip_b16_ms"][4] == "0"
    assert rows["clip_b16_adapt_ms"][1:4] == ["64", "32", "48"]
    assert rows["clip_b16_adapt_ms"][4] == f"{32 * 48 + 48:,}"                   # Linear(32, 48)
    assert rows["clip_b16_ms"][5] == f"{3 * 32 + 32 * 32 * (16 + 64 + 256):,}"  # dense windows 4/8/16
    assert "backbone tokens of the two models identical: True (shape [2, 33, 32]" in out


def test_make_sample_data_rebuilds_the_shipped_set(outputs):
    out = outputs["sample_data"]
    assert out.startswith("wrote 37 images")
    made_root = Path(outputs["tmp"]) / "sample_data"
    for split in ("query", "gallery"):
        made = sorted(p.name for p in (made_root / split).iterdir())
        assert made == sorted(p.name for p in (SAMPLE / split).iterdir())
        with Image.open(made_root / split / made[0]) as img:
            assert img.size == (64, 128)


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script", ["extract_features", "train_ddp"])
def test_examples_offer_only_models_they_can_feed(script, capsys):
    module = _load_example(script)
    multimodal = [n for n in reid_ms.list_models() if get_spec(n).model is reid_ms.MultiModalReIDModel]
    assert multimodal and not set(multimodal) & set(module.MODELS)
    assert set(module.MODELS) | set(multimodal) == set(reid_ms.list_models())   # JPM models included
    with pytest.raises(SystemExit) as stop:
        module.main(["--model", multimodal[0]])
    assert stop.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_extract_features_jpm(capsys):
    # in-process: the script's main with its own arguments, without another interpreter start-up
    _load_example("extract_features").main(["--tiny", "--model", "vit_b16_jpm", "--batch-size", "8"])
    out = capsys.readouterr().out
    # 5 BNNeck branches (global + 4 local) of the 64-wide tiny ViT
    assert "model     vit_b16_jpm: 128x64, grid 8x4, feature width 320" in out
    assert "query     7 images (0 junk dropped) -> features [7, 320]" in out


def test_train_ddp_jpm_loss_over_the_branches(tmp_path, monkeypatch, caplog, free_port):
    # one gloo process, in-process, set up as torchrun would
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(key, value)
    caplog.set_level(logging.INFO, logger="train_ddp")
    out = tmp_path / "jpm.pt"
    _load_example("train_ddp").main(["--tiny", "--steps", "2", "--batch", "4", "--model", "vit_b16_ms_jpm",
                                     "--out", str(out)])
    assert "step 2/2 loss" in caplog.text
    trained = torch.load(out, weights_only=True)
    torch.manual_seed(0)       # the example's seed and arguments: its initialisation
    model = reid_ms.build("vit_b16_ms_jpm", embed_dim=64, depth=2, num_heads=4, img_size=(64, 32), scales=(2, 4),
                          camera_num=3, num_classes=4)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(trained)                                     # strict: the JPM model's own keys
    moved = {k for k, v in trained.items() if k.startswith("head.classifiers.") and not torch.equal(v, start[k])}
    assert moved == {f"head.classifiers.{i}.weight" for i in range(5)}   # every branch's classifier is trained
    assert not torch.equal(trained["jpm.b2.0.mlp.fc1.weight"], start["jpm.b2.0.mlp.fc1.weight"])


def test_jpm_loss_is_transreids_weighting():
    example = _load_example("train_ddp")
    loss_fn, tri = example.reid_loss, example.batch_hard_triplet
    gen = torch.Generator().manual_seed(0)
    pids = torch.tensor([0, 0, 1, 1])
    logits = tuple(torch.randn(4, 3, generator=gen) for _ in range(5))
    feats = tuple(torch.randn(4, 8, generator=gen) for _ in range(5))
    ce = torch.nn.functional.cross_entropy
    expected = (0.5 * (ce(logits[0], pids) + tri(feats[0], pids))
                + 0.5 * sum(ce(s, pids) + tri(f, pids) for s, f in zip(logits[1:], feats[1:])) / 4)
    torch.testing.assert_close(loss_fn(logits, feats, pids), expected)
    torch.testing.assert_close(loss_fn(logits[0], feats[0], pids), ce(logits[0], pids) + tri(feats[0], pids))
