"""Hostile files: small on disk, they declare huge tensors, huge archive members or deep nesting.

Each must end in a reid_ms error naming the problem, within seconds, before anything proportional to what
it declares is allocated. The loads run in a fresh process whose address space may grow by 2 GiB only
(``_helpers_hostile.probe``): a loader that allocated first would fail there with a raw error, or show in
the peak resident memory, which may grow by 48 MiB at most per case.
"""

from __future__ import annotations

import builtins

import pytest
import torch

import reid_ms
from reid_ms import CheckpointError, ConfigError, VitTrans
from _helpers_hostile import MIB, VIT, hostile_cases, probe, torch_file, zero_view

MAX_GROWTH = 48 * MIB
MAX_SECONDS = 10.0  # the 1e5-deep key takes 1 s, 4 s on a loaded machine: torch unpickles it


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    cases = hostile_cases(tmp)
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
        reid_ms.load_vit_weights(model, torch_file(tmp_path / "p.pth", {"pos_embed": zero_view(1, 9, 1 << 26)}))
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
