"""PromptLearner against CLIP-ReID's prompt forward written out by hand; its checkpoints in and out."""

from __future__ import annotations

import copy

import open_clip
import pytest
import torch

from _helpers_clip_text import TINY_TEXT, open_clip_text_model, text_forward_by_hand, text_state
from reid_ms import CheckpointError, ClipText, ConfigError, InputError, PromptLearner, load_clip_weights
from reid_ms.backbones.clip_text import VEHICLE_TEMPLATE, template_for

SOT, EOT = 49406, 49407


@pytest.fixture(scope="module")
def oc_model():
    return open_clip_text_model(seed=3)


@pytest.fixture(scope="module")
def loaded_text(oc_model):
    t = ClipText(**TINY_TEXT).eval()
    t.load_state_dict(text_state(oc_model), strict=True)
    return t


@pytest.fixture
def text(loaded_text):
    return copy.deepcopy(loaded_text)


def _by_hand(state, template: str, cls_ctx: torch.Tensor, pids: torch.Tensor, heads: int = 4) -> torch.Tensor:
    """CLIP-ReID's prompt forward from the facts: embed the tokenised template, put the identity's vectors
    where its X tokens are, run the text transformer, read the end-of-text token, project."""
    ids = open_clip.tokenize([template])[0]
    x_positions = [i for i, t in enumerate(ids.tolist()) if t == open_clip.tokenize(["X"])[0, 1].item()]
    embedded = state["token_embedding.weight"][ids].expand(len(pids), -1, -1).clone()
    for row, pid in enumerate(pids.tolist()):
        embedded[row, x_positions] = cls_ctx[pid]
    eot = torch.full((len(pids),), ids.tolist().index(EOT))
    return text_forward_by_hand(state, embedded, eot, heads)


def test_template_is_split_around_the_x_tokens(text):
    prompts = PromptLearner(text, num_classes=7)
    ids = open_clip.tokenize(["A photo of a X X X X person."])[0]
    # SOT + "a photo of a" before the X run; "person" "." EOT and padding after it
    assert prompts.prefix_len == 5 and prompts.token_prefix.shape == (1, 5, 64)
    assert prompts.token_suffix.shape == (1, 77 - 5 - 4, 64)
    table = text.token_embedding.weight
    torch.testing.assert_close(prompts.token_prefix[0], table[ids[:5]], rtol=0, atol=0)
    torch.testing.assert_close(prompts.token_suffix[0], table[ids[9:]], rtol=0, atol=0)
    assert ids[0] == SOT and ids[11] == EOT
    assert prompts.cls_ctx.shape == (7, 4, 64) and prompts.ctx is prompts.cls_ctx
    assert 0.015 < prompts.cls_ctx.std().item() < 0.025  # CLIP-ReID's normal(std=0.02)


def test_forward_equals_the_prompt_forward_written_out(text, oc_model):
    prompts = PromptLearner(text, num_classes=6).eval()
    pids = torch.tensor([5, 0, 3, 3])
    with torch.no_grad():
        got = prompts(pids)
    want = _by_hand(text_state(oc_model), "A photo of a X X X X person.", prompts.cls_ctx.detach(), pids)
    assert got.shape == (4, 32)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    assert not torch.allclose(got[0], got[1], atol=1e-3)  # identities differ
    torch.testing.assert_close(got[2], got[3])


def test_vehicle_template(text, oc_model):
    assert template_for("veri") == VEHICLE_TEMPLATE and template_for("market1501").endswith("person.")
    prompts = PromptLearner(text, num_classes=3, template=VEHICLE_TEMPLATE).eval()
    vehicle = open_clip.tokenize(["vehicle"])[0, 1]
    assert torch.equal(prompts.token_suffix[0, 0], text.token_embedding.weight[vehicle])
    pids = torch.tensor([2, 1])
    with torch.no_grad():
        torch.testing.assert_close(prompts(pids), _by_hand(text_state(oc_model), VEHICLE_TEMPLATE,
                                                           prompts.cls_ctx.detach(), pids), atol=2e-5, rtol=0)


def test_only_the_identity_vectors_learn_when_the_text_tower_is_frozen(text):
    prompts = PromptLearner(text, num_classes=4)
    text.requires_grad_(False)
    prompts(torch.tensor([1, 2])).square().sum().backward()
    grad = prompts.cls_ctx.grad
    assert grad[[1, 2]].abs().sum() > 0 and grad[[0, 3]].abs().sum() == 0
    assert all(p.grad is None for p in text.parameters())
    assert [n for n, p in prompts.named_parameters() if p.requires_grad] == ["cls_ctx"]


def test_all_features_is_every_identity_in_order(text):
    prompts = PromptLearner(text, num_classes=5).eval()
    feats = prompts.all_features(batch_size=2)
    with torch.no_grad():
        torch.testing.assert_close(feats, prompts(torch.arange(5)), atol=1e-6, rtol=0)


def test_bad_templates_and_labels_are_named(text):
    with pytest.raises(ConfigError, match="n_ctx=4"):
        PromptLearner(text, 3, template="A photo of a person.")
    with pytest.raises(ConfigError, match="consecutive"):
        PromptLearner(text, 3, template="A photo of X X a X X person.")
    with pytest.raises(ConfigError, match="n_ctx=2"):
        PromptLearner(text, 3, n_ctx=2)
    prompts = PromptLearner(text, 3)
    with pytest.raises(InputError, match=r"\[0, 3\)"):
        prompts(torch.tensor([3]))
    with pytest.raises(InputError, match="labels"):
        prompts(torch.tensor([[0]]))


# --- checkpoints -----------------------------------------------------------------------------------------

def test_openai_file_loads_the_tower_and_reembeds_the_template(text, oc_model, tmp_path):
    path = tmp_path / "ViT-B-16.pt"
    torch.save(oc_model.state_dict(), path)
    prompts = PromptLearner(ClipText(**TINY_TEXT), num_classes=4).eval()
    ctx = prompts.cls_ctx.detach().clone()
    report = load_clip_weights(prompts, path)
    assert report.kind == "openai" and report.kept_init == ["cls_ctx"]
    torch.testing.assert_close(prompts.cls_ctx, ctx, rtol=0, atol=0)
    ids = open_clip.tokenize(["A photo of a X X X X person."])[0]
    torch.testing.assert_close(prompts.token_prefix[0], text.token_embedding.weight[ids[:5]], rtol=0, atol=0)
    pids = torch.tensor([0, 3])
    with torch.no_grad():
        torch.testing.assert_close(prompts(pids), _by_hand(text_state(oc_model), prompts.template, ctx, pids),
                                   atol=2e-5, rtol=0)


def _clip_reid_checkpoint(text: ClipText, prompts: PromptLearner) -> dict[str, torch.Tensor]:
    """The text side as CLIP-ReID saves it: text_encoder.* without the token embedding, prompt_learner.*."""
    ckpt = {f"text_encoder.{k}": v.clone() for k, v in text.state_dict().items() if k != "token_embedding.weight"}
    ckpt.update({f"prompt_learner.{k}": v.clone() for k, v in prompts.state_dict().items() if not k.startswith("text.")})
    ckpt["classifier.weight"] = torch.randn(prompts.num_classes, 16)
    return ckpt


def test_clip_reid_checkpoint_fills_the_learned_prompts(text, oc_model, tmp_path):
    trained = PromptLearner(text, num_classes=6)
    with torch.no_grad():
        trained.cls_ctx.normal_(std=0.3)
    path = tmp_path / "ViT-B-16_60.pth"
    torch.save({f"module.{k}": v for k, v in _clip_reid_checkpoint(text, trained).items()}, path)

    fresh_text = ClipText(**TINY_TEXT)
    fresh = PromptLearner(fresh_text, num_classes=6).eval()
    report = load_clip_weights(fresh, path)
    assert report.kind == "clip-reid" and report.kept_init == ["text.token_embedding.weight"]
    for k in ("cls_ctx", "token_prefix", "token_suffix"):
        torch.testing.assert_close(getattr(fresh, k), getattr(trained, k), rtol=0, atol=0)
    pids = torch.tensor([4, 1])
    with torch.no_grad():
        torch.testing.assert_close(fresh(pids), _by_hand(text_state(oc_model), fresh.template,
                                                         trained.cls_ctx.detach(), pids), atol=2e-5, rtol=0)


def test_saved_prompt_learner_round_trips(text, tmp_path):
    trained = PromptLearner(text, num_classes=3)
    path = tmp_path / "prompts.pt"
    torch.save(trained.state_dict(), path)
    fresh = PromptLearner(ClipText(**TINY_TEXT), num_classes=3)
    report = load_clip_weights(fresh, path)
    assert report.kind == "reid_ms-prompts" and not report.kept_init
    for k, v in trained.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k], v, rtol=0, atol=0)


def test_prompts_of_another_shape_are_refused_with_the_arguments_to_use(text, tmp_path):
    path = tmp_path / "ViT-B-16_60.pth"
    torch.save(_clip_reid_checkpoint(text, PromptLearner(text, num_classes=6)), path)
    fresh = PromptLearner(ClipText(**TINY_TEXT), num_classes=5)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(CheckpointError, match="num_classes=6, n_ctx=4"):
        load_clip_weights(fresh, path)
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())
    for template in ("A photo of the one X X X X person.", "A photo of a X X X X tall person.",
                     "A photo of a X X X X."):
        other = PromptLearner(ClipText(**TINY_TEXT), num_classes=6, template=template)
        with pytest.raises(CheckpointError, match="template"):
            load_clip_weights(other, path)
