"""``reid-ms train`` / ``reid_ms.training.train`` on tiny models and tiny synthetic data sets."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

from _helpers_dist import join_gloo, spawn

import reid_ms
from reid_ms.cli import main
from reid_ms.errors import CheckpointError, ConfigError
from reid_ms.training import TrainHook, train

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"

# a 4 x 2 patch grid, 16 wide, one block: a training step takes milliseconds
TINY = {"img_size": (32, 16), "patch_size": 8, "stride_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 2}
TINY_SET = [f"{k}={v!r}" for k, v in TINY.items() if k != "img_size"]
SMALL_BATCH = dict(batch_size=8, num_instances=2)


def _make_market(out: Path, **sizes) -> Path:
    spec = importlib.util.spec_from_file_location("make_sample_data", ROOT / "examples" / "make_sample_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.make_market_data(out, **sizes)
    return out


@pytest.fixture(scope="module")
def market(tmp_path_factory) -> Path:
    """6 training ids x 4 cameras (24 crops, 3 batches of 8 per epoch), 4 test ids, distractors, junk."""
    return _make_market(tmp_path_factory.mktemp("market"), people=4, train_people=6, per_camera=1)


def _tiny_train(market: Path, out: Path, name: str = "vit_b16", **kwargs):
    args = dict(dataset="folder", root=market, out=out, overrides={k: v for k, v in TINY.items() if k != "img_size"},
                img_size=TINY["img_size"], workers=0, progress=False, **SMALL_BATCH)
    return train(name, **{**args, **kwargs})


@pytest.fixture(scope="module")
def cli_run(market, tmp_path_factory) -> Path:
    """A two-epoch run through the command line, evaluated after each epoch."""
    out = tmp_path_factory.mktemp("run") / "out"
    argv = ["train", "vit_b16_ms", "--dataset", "folder", "--root", str(market), "--out", str(out), "--epochs", "2",
            "--batch-size", "8", "--num-instances", "2", "--img-size", "32", "16", "--eval-every", "1",
            "--workers", "0", "--set", "lr=0.01", "--set", "warmup_epochs=2", "--set", "scales=(2, 4)", "-q"]
    for item in TINY_SET:
        argv += ["--set", item]
    assert main(argv) == 0
    return out


def test_cli_run_writes_config_metrics_checkpoint_and_curves(cli_run):
    config = json.loads((cli_run / "config.json").read_text())
    assert config["model"] == "vit_b16_ms" and config["dataset"] == "folder"
    assert config["recipe"]["name"] == "transreid" and config["recipe"]["lr"] == 0.01
    assert config["num_classes"] == 6 and config["build"]["camera_num"] == 4   # from the data: SIE on 4 cameras
    rows = [json.loads(line) for line in (cli_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        assert math.isfinite(r["loss"]) and r["loss"] > 0
        assert 0.0 <= r["mAP"] <= 1.0 and 0.0 <= r["rank1"] <= 1.0
    # TransReID's warm-up cosine worked by hand for lr 0.01, 2 epochs, 2 warm-up epochs: epoch 1 is
    # warmup_lr_init + 1 * (lr - warmup_lr_init) / 2 with warmup_lr_init = 0.01 * lr; epoch 2 is past the
    # warm-up at the cosine's end, lr_min = 0.002 * lr. (A bias group's lr, 2x, would read 0.01005.)
    assert rows[0]["lr"] == pytest.approx(0.0001 + (0.01 - 0.0001) / 2, rel=1e-9)
    assert rows[1]["lr"] == pytest.approx(0.002 * 0.01, rel=1e-9)
    assert (cli_run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in cli_run.iterdir() if p.name.endswith(".tmp")]


def test_last_pt_is_weights_only_and_loads_into_the_model(cli_run):
    state = torch.load(cli_run / "last.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 2
    for key in ("optimizer", "scheduler", "sampler", "rng", "history", "config"):
        assert key in state
    assert set(state["rng"]) >= {"torch", "numpy", "python"}
    model = reid_ms.build("vit_b16_ms", num_classes=6, camera_num=4, scales=(2, 4), **TINY)
    model.load_state_dict(state["model"])          # strict: every key of the model, no other
    assert torch.equal(model.head.classifier.weight, state["model"]["head.classifier.weight"])


def test_build_pretrained_reads_last_pt(cli_run):
    # needs build(pretrained=) to take a {"model": state_dict} file (the loaders' side of the contract)
    state = torch.load(cli_run / "last.pt", map_location="cpu", weights_only=True)["model"]
    model = reid_ms.build("vit_b16_ms", pretrained=cli_run / "last.pt", num_classes=6, camera_num=4, scales=(2, 4), **TINY)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_run_folder_is_not_overwritten_and_resume_checks_settings(cli_run, market):
    with pytest.raises(ConfigError, match="resume"):
        _tiny_train(market, cli_run, name="vit_b16_ms", epochs=2)
    same = {**{k: v for k, v in TINY.items() if k != "img_size"}, "lr": 0.01, "warmup_epochs": 2, "scales": (2, 4)}
    with pytest.raises(ConfigError, match="recipe.lr: 0.01 -> 0.02"):
        _tiny_train(market, cli_run, name="vit_b16_ms", epochs=2, resume=True, overrides={**same, "lr": 0.02})
    # the same settings (evaluation may differ): the finished run is returned as it is
    before = (cli_run / "last.pt").stat().st_mtime_ns
    done = _tiny_train(market, cli_run, name="vit_b16_ms", epochs=2, resume=True, overrides=same, eval_every=0)
    assert [r["epoch"] for r in done.history] == [1, 2] and (cli_run / "last.pt").stat().st_mtime_ns == before


def test_damaged_checkpoint_is_a_checkpoint_error(market, tmp_path):
    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="damaged"):
        _tiny_train(market, tmp_path, epochs=1, resume=True)


def test_resume_after_sigkill_mid_epoch_is_bit_identical(market, tmp_path):
    common = ["--dataset", "folder", "--root", str(market), "--epochs", "2", "--batch-size", "8", "--num-instances",
              "2", "--img-size", "32", "16", "--eval-every", "0", "--workers", "1", "-q"]
    for item in TINY_SET:
        common += ["--set", item]
    threads = torch.get_num_threads()
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": str(threads)}
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "reid_ms.cli", "train", "vit_b16", "--out", str(killed), *common],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (killed / "last.pt").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.002)
    # the whole job, its data-loader worker too: a worker orphaned while blocked on a full queue never exits
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert torch.load(killed / "last.pt", weights_only=True)["epoch"] == 1    # killed inside epoch 2

    assert main(["train", "vit_b16", "--out", str(killed), "--resume", *common]) == 0
    assert main(["train", "vit_b16", "--out", str(tmp_path / "straight"), *common]) == 0
    resumed = torch.load(killed / "last.pt", weights_only=True)
    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    assert resumed["epoch"] == straight["epoch"] == 2
    assert resumed["model"].keys() == straight["model"].keys()
    for key in straight["model"]:
        assert torch.equal(resumed["model"][key], straight["model"][key]), key
    assert [r["loss"] for r in resumed["history"]] == [r["loss"] for r in straight["history"]]
    rows = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]


class _ConstantLoss(TrainHook):
    def __init__(self, value: float) -> None:
        self.value = value
        self.started = 0

    def before_training(self, context) -> None:
        self.started += 1
        assert context.model.head.num_classes == 6

    def extra_loss(self, context, logits, features, pids):
        return torch.tensor(self.value)

    def state_dict(self):
        return {"value": self.value, "started": self.started}


def test_hooks_add_their_loss_and_are_checkpointed(market, tmp_path):
    plain = _tiny_train(market, tmp_path / "plain", epochs=1)
    hook = _ConstantLoss(0.5)
    recipe = dataclasses.replace(reid_ms.training.get_recipe("transreid"), hooks=(hook,))
    hooked = _tiny_train(market, tmp_path / "hooked", epochs=1, recipe=recipe)
    assert hook.started == 1
    # a constant has no gradient: same model, loss higher by exactly the constant
    assert hooked.history[0]["loss"] == pytest.approx(plain.history[0]["loss"] + 0.5, abs=1e-6)
    for (key, a), b in zip(plain.model.state_dict().items(), hooked.model.state_dict().values()):
        assert torch.equal(a, b), key
    assert torch.load(hooked.checkpoint, weights_only=True)["hooks"] == [{"value": 0.5, "started": 1}]


def test_grad_checkpointing_trains_the_same_weights(market, tmp_path):
    plain = _tiny_train(market, tmp_path / "plain", epochs=1)
    checkpointed = _tiny_train(market, tmp_path / "ckpt", epochs=1, grad_checkpointing=True)
    assert checkpointed.model.backbone.grad_checkpointing and not plain.model.backbone.grad_checkpointing
    for (key, a), b in zip(plain.model.state_dict().items(), checkpointed.model.state_dict().values()):
        assert torch.equal(a, b), key


def test_clipreid_recipe_uses_adam_and_the_warmup_multistep_lr(market, tmp_path, one_thread):
    # a CLIP model (the recipe's text stage needs one) with a one-layer text tower and two stage-1 epochs
    clip = {"patch_size": 8, "stride_size": 8, "width": 16, "layers": 1, "heads": 2, "output_dim": 16,
            "text_width": 16, "text_layers": 1, "text_heads": 2, "stage1_epochs": 2}
    result = _tiny_train(market, tmp_path, name="clip_b16", recipe="clipreid", epochs=1,
                         overrides={**clip, "milestones": (1,)})
    state = torch.load(result.checkpoint, weights_only=True)
    groups = state["optimizer"]["param_groups"]
    assert all("betas" in g for g in groups)                                  # Adam
    assert "camera_num" not in state["config"]["build"]                      # vit_clipreid.yml: no SIE
    assert sorted({g["weight_decay"] for g in groups}) == [1e-4]
    # CLIP-ReID's WarmupMultiStepLR at epoch 1 of 10 linear warm-up epochs from 0.1, after milestone 1:
    # 5e-6 * (0.1 * (1 - 1/10) + 1/10) * 0.1
    assert result.history[0]["lr"] == pytest.approx(5e-6 * 0.19 * 0.1, rel=1e-9)


def test_jpm_model_trains_with_its_branch_losses(market, tmp_path):
    # the JPM takes the last block: two blocks, so one stays in the backbone; TransReID's 4 local groups
    over = {**{k: v for k, v in TINY.items() if k != "img_size"}, "depth": 2}
    result = _tiny_train(market, tmp_path, name="vit_b16_jpm", epochs=1, overrides=over)
    assert math.isfinite(result.history[0]["loss"])
    assert 0 <= result.history[0]["mAP"] <= 1
    assert result.model.feat_dim == 5 * 16


def _make_rgbnt(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, people in (("train_171", range(1, 5)), ("test", range(5, 8))):
        for modality in ("RGB", "NI", "TI"):
            (root / split / modality).mkdir(parents=True)
        for pid in people:
            colour = rng.uniform(0, 255, 3)
            for cam in (1, 2):
                name = f"{pid:06d}_cam{cam}_0_00.jpg"
                for modality in ("RGB", "NI", "TI"):
                    pixels = np.clip(colour + rng.normal(0, 20, (32, 16, 3)), 0, 255).astype(np.uint8)
                    Image.fromarray(pixels).save(root / split / modality / name)
    return root


def test_multimodal_model_trains_on_rgbnt201(tmp_path):
    root = _make_rgbnt(tmp_path / "RGBNT201")
    result = train("vit_b16_ms_rgbnt", dataset="rgbnt201", root=root, out=tmp_path / "out", epochs=1,
                   batch_size=4, num_instances=2, img_size=(32, 16), workers=0, progress=False,
                   overrides={**{k: v for k, v in TINY.items() if k != "img_size"}, "scales": (2,)})
    assert math.isfinite(result.history[0]["loss"]) and 0 <= result.history[0]["mAP"] <= 1
    assert result.model.feat_dim == 3 * 16


def test_single_image_model_on_rgbnt201_is_refused(tmp_path):
    root = _make_rgbnt(tmp_path / "RGBNT201")
    with pytest.raises(ConfigError, match="multi-modal|several images"):
        train("vit_b16", dataset="rgbnt201", root=root, out=tmp_path / "out", epochs=1, batch_size=4,
              num_instances=2, img_size=(32, 16), progress=False, overrides={k: v for k, v in TINY.items() if k != "img_size"})


@pytest.mark.parametrize("kwargs, match", [
    (dict(amp="bf16", device="cpu"), "CUDA"),
    (dict(amp="fp8"), "amp must be one of"),
    (dict(overrides={"num_classes": 3}), "num_classes comes from the training set"),
    (dict(overrides={"lrr": 0.1}), "unknown setting 'lrr'; did you mean 'lr'"),
    (dict(overrides={"margin": "big"}), "margin takes a float or None"),
    (dict(batch_size=6, num_instances=4), "multiple of num_instances"),
    (dict(dataset="cuhk03"), "unknown dataset"),
    (dict(device="gpu0"), "not a torch device"),
])
def test_bad_settings_are_config_errors(market, tmp_path, kwargs, match):
    args = dict(dataset="folder", root=market, out=tmp_path, epochs=1, progress=False)
    args.update(kwargs)
    with pytest.raises(ConfigError, match=match):
        train("vit_b16", **args)
    assert not (tmp_path / "last.pt").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_cuda_device_without_cuda_is_a_config_error(market, tmp_path):
    with pytest.raises(ConfigError, match="no CUDA device"):
        train("vit_b16", dataset="folder", root=market, out=tmp_path, device="cuda", progress=False)


def test_cli_amp_on_cpu_exits_with_status_2(market, tmp_path, capsys):
    argv = ["train", "vit_b16", "--dataset", "folder", "--root", str(market), "--out", str(tmp_path),
            "--device", "cpu", "--amp", "fp16"]
    assert main(argv) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def _ddp_worker(rank: int, world: int, port: int, market: str, out: str) -> None:
    join_gloo(rank, world, port, timeout_s=60)
    result = _tiny_train(Path(market), Path(out) / "run", epochs=1)
    torch.save({"state": result.model.state_dict(),
                "synced": type(result.model.head.bottleneck).__name__}, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_ddp_two_processes_train_one_model(market, tmp_path, free_port):
    spawn(_ddp_worker, (2, free_port(), str(market), str(tmp_path)), nprocs=2, timeout=120)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["synced"] for r in ranks] == ["SyncBatchNorm", "SyncBatchNorm"]
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert saved["config"]["world_size"] == 2 and saved["epoch"] == 1
    for key, value in saved["model"].items():
        # DDP averaged the gradients and SyncBatchNorm the BNNeck's statistics: one model on both ranks
        assert torch.equal(ranks[0]["state"][key], value) and torch.equal(ranks[1]["state"][key], value), key


def test_curves_without_matplotlib_log_once_and_write_nothing(tmp_path, monkeypatch, caplog):
    from reid_ms.training import curves

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)       # import fails as if not installed
    monkeypatch.setattr(curves, "_warned", False)
    rows = [{"epoch": 1, "loss": 2.0, "lr": 0.01, "mAP": 0.5, "rank1": 0.6}]
    with caplog.at_level("INFO", logger="reid_ms.training"):
        assert curves.plot_curves(tmp_path / "curves.png", rows) is False
        assert curves.plot_curves(tmp_path / "curves.png", rows) is False
    assert [r.message for r in caplog.records if "matplotlib" in r.message] == [
        "matplotlib is not installed: curves.png is not drawn (pip install matplotlib); metrics.jsonl holds the "
        "same numbers"]
    assert not (tmp_path / "curves.png").exists()
