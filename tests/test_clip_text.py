"""ClipText: open_clip's encode_text as the oracle; load_clip_weights reading the text half of every format."""

from __future__ import annotations

import open_clip
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

from _helpers_clip import (OpenAIStyleCLIP, convert_to_openai_fp16, randomise_norms_and_biases,
                           write_openai_archive)
from _helpers_clip_text import TINY_TEXT, open_clip_text_model, text_forward_by_hand, text_state
from reid_ms import CheckpointError, ClipText, ClipVisual, ConfigError, InputError, load_clip_weights

SENTENCES = ["A photo of a X X X X person.", "a man in a red coat carrying a black backpack",
             "", "the quick brown fox " * 30]  # the last is cut to the context length


@pytest.fixture(scope="module")
def oc_model():
    return open_clip_text_model()


@pytest.fixture(scope="module")
def loaded_text(oc_model):
    return _loaded_text(oc_model)


def _loaded_text(oc_model) -> ClipText:
    text = ClipText(**TINY_TEXT).eval()
    text.load_state_dict(text_state(oc_model), strict=True)
    return text


def test_parameter_names_and_shapes_are_clips():
    with torch.device("meta"):  # shapes only
        text = ClipText()
    shapes = {k: tuple(v.shape) for k, v in text.state_dict().items()}
    assert shapes["token_embedding.weight"] == (49408, 512)
    assert shapes["positional_embedding"] == (77, 512)
    assert shapes["text_projection"] == (512, 512)
    assert shapes["ln_final.weight"] == (512,)
    assert shapes["transformer.resblocks.11.attn.in_proj_weight"] == (1536, 512)
    assert shapes["transformer.resblocks.11.mlp.c_fc.weight"] == (2048, 512)
    assert "transformer.resblocks.12.ln_1.weight" not in shapes


def test_tokenize_is_open_clips():
    text = ClipText(**TINY_TEXT)
    torch.testing.assert_close(text.tokenize(SENTENCES), open_clip.tokenize(SENTENCES), rtol=0, atol=0)
    assert text.tokenize("one").shape == (1, 77)


def test_encode_equals_open_clip_encode_text(oc_model):
    text = _loaded_text(oc_model)
    ids = text.tokenize(SENTENCES)
    with torch.no_grad():
        torch.testing.assert_close(text.encode(ids), oc_model.encode_text(ids), atol=2e-5, rtol=0)
        torch.testing.assert_close(text(ids), oc_model.encode_text(ids), atol=2e-5, rtol=0)


def test_full_size_encode_equals_open_clip_vit_b16_quickgelu():
    # ViT-B-16-quickgelu's own text transformer (width, depth, heads, context, projection); a minimal image
    # tower and a short vocabulary keep the build fast
    cfg = open_clip.get_model_config("ViT-B-16-quickgelu")
    assert cfg["quick_gelu"] and cfg["embed_dim"] == 512
    tc = cfg["text_cfg"]
    oc = open_clip_text_model(width=tc["width"], layers=tc["layers"], heads=tc["heads"], output_dim=cfg["embed_dim"],
                              context_length=tc["context_length"], vocab_size=1000)
    text = ClipText(vocab_size=1000).eval()
    text.load_state_dict(text_state(oc), strict=True)
    ids = torch.randint(1, 998, (2, 77), generator=torch.Generator().manual_seed(0))
    ids[0, 20], ids[1, 76] = 999, 999  # end-of-text: the largest id of the row
    with torch.no_grad():
        torch.testing.assert_close(text.encode(ids), oc.encode_text(ids), atol=2e-5, rtol=0)


@settings(derandomize=True, deadline=None, max_examples=6)
@given(length=st.integers(1, 30), seed=st.integers(0, 2**16))
def test_causal_mask_makes_later_tokens_invisible(loaded_text, length, seed):
    # with a causal mask, cutting the sequence after the end-of-text token changes nothing
    text = loaded_text
    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros(2, 77, dtype=torch.long)
    ids[:, 1:length] = torch.randint(1, 49000, (2, length - 1), generator=gen)
    ids[:, 0], ids[:, length] = 49406, 49407
    noisy = ids.clone()
    noisy[:, length + 1:] = torch.randint(1, 49000, (2, 76 - length), generator=gen)
    with torch.no_grad():
        full = text.encode(ids)
        torch.testing.assert_close(text.encode(ids[:, : length + 1]), full, atol=2e-5, rtol=0)
        torch.testing.assert_close(text.encode(noisy), full, atol=2e-5, rtol=0)


def test_grad_checkpointing_gives_the_same_output_and_gradients(oc_model):
    text = _loaded_text(oc_model).train()
    ids = text.tokenize(SENTENCES[:2])
    out = text.encode(ids)
    out.square().sum().backward()
    grads = {k: p.grad.clone() for k, p in text.named_parameters()}
    text.zero_grad()
    text.set_grad_checkpointing(True)
    out2 = text.encode(ids)
    out2.square().sum().backward()
    torch.testing.assert_close(out2, out)
    for k, p in text.named_parameters():
        torch.testing.assert_close(p.grad, grads[k], msg=k)


def test_bad_inputs_and_configs_are_named():
    text = ClipText(**TINY_TEXT)
    with pytest.raises(InputError, match="vocab_size"):
        text.encode(torch.full((1, 5), 49408))
    with pytest.raises(InputError, match="at most 77"):
        text.encode(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(InputError, match="int64"):
        text.encode(torch.zeros(1, 5))
    with pytest.raises(InputError, match=r"\[B, L\]"):
        text.encode(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ConfigError, match="divisible"):
        ClipText(width=64, heads=5)
    with pytest.raises(ConfigError, match="positive int"):
        ClipText(layers=0)


# --- load_clip_weights: the text half ------------------------------------------------------------------

def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("layout", ["openai", "wrapped_ddp", "safetensors"])
def test_open_clip_and_openai_layouts_load_the_text_tower(oc_model, tmp_path, layout):
    sd = {k: v.detach().clone().contiguous() for k, v in oc_model.state_dict().items()}
    path = tmp_path / ("ckpt.safetensors" if layout == "safetensors" else "ckpt.pt")
    if layout == "wrapped_ddp":
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    elif layout == "safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    text = ClipText(**TINY_TEXT).eval()
    report = load_clip_weights(text, path)
    assert report.kind == ("open_clip" if layout == "wrapped_ddp" else "openai")
    assert sorted(report.loaded) == sorted(text.state_dict()) and not report.kept_init
    assert "visual.conv1.weight" in report.ignored and "logit_scale" in report.ignored
    ids = text.tokenize(SENTENCES)
    with torch.no_grad():
        torch.testing.assert_close(text.encode(ids), oc_model.encode_text(ids), atol=2e-5, rtol=0)


def test_openai_torchscript_archive_loads_through_the_safe_reader(tmp_path, monkeypatch):
    source = convert_to_openai_fp16(OpenAIStyleCLIP())
    randomise_norms_and_biases(source.transformer)
    path = tmp_path / "ViT-B-16.pt"
    write_openai_archive(path, source)
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: pytest.fail("the archive must not be run"))
    text = ClipText(context_length=16, vocab_size=100, width=32, layers=1, heads=2, output_dim=32).eval()
    report = load_clip_weights(text, path)
    assert report.kind == "openai" and report.format == "torchscript"
    want = {k: v.float() for k, v in source.state_dict().items() if k in text.state_dict()}
    assert set(want) == set(text.state_dict())
    for k, v in text.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=0, msg=k)
    ids = torch.tensor([[3, 17, 42, 99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        torch.testing.assert_close(text.encode(ids), text_forward_by_hand(want, text.token_embedding(ids),
                                                                          torch.tensor([3]), heads=2),
                                   atol=2e-5, rtol=0)


def test_clip_reid_checkpoint_loads_all_but_the_token_embedding(oc_model, tmp_path, caplog):
    sd = text_state(oc_model)
    ckpt = {f"text_encoder.{k}": v for k, v in sd.items() if k != "token_embedding.weight"}
    ckpt.update({"prompt_learner.cls_ctx": torch.randn(5, 4, 64), "prompt_learner.token_prefix": torch.randn(1, 5, 64),
                 "prompt_learner.token_suffix": torch.randn(1, 68, 64), "image_encoder.conv1.weight":
                 torch.randn(8, 3, 16, 16), "cv_embed": torch.randn(3, 8), "classifier_proj.weight": torch.randn(5, 32)})
    path = tmp_path / "ViT-B-16_60.pth"
    torch.save(ckpt, path)
    text = ClipText(**TINY_TEXT)
    token_embedding = text.token_embedding.weight.detach().clone()
    report = load_clip_weights(text, path)
    assert report.kind == "clip-reid" and report.kept_init == ["token_embedding.weight"]
    assert "token_embedding" in caplog.text
    torch.testing.assert_close(text.token_embedding.weight, token_embedding, rtol=0, atol=0)
    for k, v in sd.items():
        if k != "token_embedding.weight":
            torch.testing.assert_close(text.state_dict()[k], v, rtol=0, atol=0)
    assert "PromptLearner" in report.ignored["prompt_learner.cls_ctx"]
    assert "image side" in report.ignored["image_encoder.conv1.weight"]


def test_wrong_sizes_and_foreign_files_raise_and_leave_the_model_unchanged(oc_model, tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save(oc_model.state_dict(), path)
    text = ClipText(context_length=77, vocab_size=49408, width=64, layers=3, heads=4, output_dim=32)
    before = _snapshot(text)
    with pytest.raises(CheckpointError, match="layers=2"):
        load_clip_weights(text, path)
    assert all(torch.equal(v, before[k]) for k, v in text.state_dict().items())

    visual_only = tmp_path / "visual.pt"
    torch.save(ClipVisual(img_size=(32, 16), width=32, layers=1, heads=2, output_dim=16).state_dict(), visual_only)
    with pytest.raises(CheckpointError, match="image encoder only"):
        load_clip_weights(ClipText(**TINY_TEXT), visual_only)

    with pytest.raises(ConfigError, match="ClipText"):
        load_clip_weights(nn.Linear(2, 2), path)
