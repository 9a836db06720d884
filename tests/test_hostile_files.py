"""Hostile files: small on disk, they declare huge tensors, huge archive members or deep nesting.

Each must end in a reid_ms error naming the problem, within seconds, before anything proportional to what
it declares is allocated. The loads run in a fresh process whose address space may grow by 2 GiB only
(``_helpers_hostile.probe``): a loader that allocated first would fail there with a raw error, or show in
the peak resident memory, which may grow by 48 MiB at most per case.
"""

from __future__ import annotations

import builtins
import json

import pytest
import torch

import reid_ms
from reid_ms import CheckpointError, ConfigError, VitTrans
from _helpers_hostile import (
    MIB,
    deep_key_pickle,
    deflated_zeros_member,
    probe,
    torch_file,
    ts_archive,
    ts_nested,
    ts_record,
    ts_tensor,
)

VIT = dict(img_size=(64, 32), patch_size=16, stride_size=16, embed_dim=32, depth=2, num_heads=4)
CLIP = dict(img_size=(64, 32), patch_size=8, stride_size=8, width=64, layers=2, heads=4, output_dim=32)
BOMB = 256 * MIB
MAX_GROWTH = 48 * MIB
MAX_SECONDS = 5.0


def _zero_view(*shape: int) -> torch.Tensor:
    """One stored float viewed as ``shape`` with stride 0: a few bytes on disk, any size declared."""
    return torch.zeros(1).expand(*shape)


def _small_archive(tmp, name):
    record = ts_record({"visual": ts_record({"class_embedding": ts_tensor("0", 64, (64,), (1,))})})
    return ts_archive(tmp / name, record, {"0": bytes(256)})


def _cases(tmp) -> dict[str, tuple[str, object, str]]:
    """name -> (target, path, what the error must say)."""
    vit, clip = "vit:" + json.dumps(VIT), "clip:" + json.dumps(CLIP)
    pos_ts = ts_record({"visual": ts_record({
        "class_embedding": ts_tensor("0", 64, (64,), (1,)),
        "positional_embedding": ts_tensor("0", 64, (33, 1 << 26), (0, 0)),
    })})
    google = {"embedding/kernel": _zero_view(16, 16, 3, 1 << 22), "embedding/bias": torch.zeros(32), "cls": torch.zeros(1, 1, 32)}
    deep = ts_nested(2000, ts_record({"w": ts_tensor("0", 4, (4,), (1,))}))
    torch.save({"pos_embed": torch.zeros(1, 9, 32)}, tmp / "small.pth")
    return {
        "pos_embed 2^26 columns, stride 0": (vit, torch_file(tmp / "p26.pth", {"pos_embed": _zero_view(1, 9, 1 << 26)}), "pos_embed"),
        "pos_embed 2^34 columns, stride 0": (vit, torch_file(tmp / "p34.pth", {"pos_embed": _zero_view(1, 9, 1 << 34)}), "pos_embed"),
        "pos_embed 8192x8192 grid of the model's width, stride 0": (
            vit, torch_file(tmp / "grid.pth", {"pos_embed": _zero_view(1, 1 + (1 << 26), 32)}), "pos_embed"),
        "positional_embedding 8192x8192 grid of the model's width, stride 0": (clip, torch_file(tmp / "cgrid.pth", {
            "class_embedding": torch.zeros(64), "positional_embedding": _zero_view(1 + (1 << 26), 64)}),
            "positional_embedding"),
        "positional_embedding 2^26 columns (.pth)": (clip, torch_file(tmp / "c26.pth", {
            "class_embedding": torch.zeros(64), "positional_embedding": _zero_view(33, 1 << 26)}), "positional_embedding"),
        "positional_embedding 2^26 columns (TorchScript)": (
            clip, ts_archive(tmp / "c26.pt", pos_ts, {"0": bytes(256)}), "positional_embedding"),
        "Google keys in a .pth, stride 0": (vit, torch_file(tmp / "g.pth", google), "embedding/kernel"),
        "TorchScript member inflating to 256 MiB": (
            clip, deflated_zeros_member(_small_archive(tmp, "ts.pt"), tmp / "tsbomb.pt", "data/0", BOMB), "bomb"),
        "torch.save member inflating to 256 MiB": (
            vit, deflated_zeros_member(tmp / "small.pth", tmp / "bomb.pth", "data/0", BOMB), "bomb"),
        "2000 nested TorchScript records": (clip, ts_archive(tmp / "deep.pt", deep, {"0": bytes(16)}), "nest deeper"),
        "tuple key nested 1e5 deep": (vit, deep_key_pickle(tmp / "key.pth", 100_000), "tuple key"),
        "sparse tensor": (vit, torch_file(tmp / "sparse.pth", {"pos_embed": torch.zeros(9, 32).to_sparse()}), "sparse"),
        "meta tensor": (vit, torch_file(tmp / "meta.pth", {"pos_embed": torch.empty(1, 9, 32, device="meta")}), "meta"),
        "float4 tensor": (vit, torch_file(tmp / "f4.pth", {"pos_embed": torch.empty(1, 9, 32, dtype=torch.float4_e2m1fn_x2)}),
                          "float4"),
        "through build(pretrained=)": ("build:vit_b16|" + json.dumps(VIT), tmp / "p34.pth", "pos_embed"),
    }


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    cases = _cases(tmp)
    results = probe([(target, str(path)) for target, path, _ in cases.values()])
    return {name: (result, cases[name][2]) for name, result in zip(cases, results)}


@pytest.mark.parametrize("case", [
    "pos_embed 2^26 columns, stride 0", "pos_embed 2^34 columns, stride 0", "positional_embedding 2^26 columns (.pth)",
    "pos_embed 8192x8192 grid of the model's width, stride 0",
    "positional_embedding 8192x8192 grid of the model's width, stride 0",
    "positional_embedding 2^26 columns (TorchScript)", "Google keys in a .pth, stride 0",
    "TorchScript member inflating to 256 MiB", "torch.save member inflating to 256 MiB",
    "2000 nested TorchScript records", "tuple key nested 1e5 deep", "sparse tensor", "meta tensor", "float4 tensor",
    "through build(pretrained=)",
])
def test_hostile_file_is_refused_by_name_before_allocating(outcomes, case):
    result, says = outcomes[case]
    assert result["outcome"] == "CheckpointError", result
    assert says in result["message"], result["message"]
    assert result["grown"] < MAX_GROWTH, f"{case}: peak memory grew by {result['grown'] / MIB:.0f} MiB"
    assert result["seconds"] < MAX_SECONDS, f"{case}: {result['seconds']:.1f} s"


def test_the_model_is_unchanged_after_a_refusal(tmp_path):
    model = VitTrans(**VIT)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="pos_embed"):
        reid_ms.load_vit_weights(model, torch_file(tmp_path / "p.pth", {"pos_embed": _zero_view(1, 9, 1 << 26)}))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_an_unreadable_file_is_named(tmp_path, monkeypatch):
    path = torch_file(tmp_path / "locked.pth", {"pos_embed": torch.zeros(1, 9, 32)})
    real_open = builtins.open

    def no_permission(file, *args, **kwargs):
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_permission)  # the tests run as root, where chmod 000 still reads
    with pytest.raises(CheckpointError, match="cannot be read \\(Permission denied\\)"):
        reid_ms.load_vit_weights(VitTrans(**VIT), path)


def test_a_file_that_fails_to_read_is_named():
    with pytest.raises(CheckpointError, match="/proc/self/mem.*cannot be read"):
        reid_ms.load_vit_weights(VitTrans(**VIT), "/proc/self/mem")


def test_pretrained_true_is_a_config_error():
    with pytest.raises(ConfigError, match="pretrained takes the path"):
        reid_ms.build("vit_b16", pretrained=True, **VIT)
