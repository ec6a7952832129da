"""IV-ViT: one ViT for image batches and clips, class-token shift between frames, one head per dataset."""
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch.utils.flop_counter import FlopCounterMode

import models
from models.describe import count
from models.ivvit import TokenShiftBlock

TINY = dict(img_size=32, embed_dim=32, depth=2, num_heads=2)
HEADS = {"k400": 7, "imagenet": 3}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny(**options):
    return models.build("ivvit_tiny_patch16_224", num_classes=7, num_frames=4, **{**TINY, "heads": HEADS, **options})


def with_same_weights(model, **options):
    twin = tiny(**options)
    twin.load_state_dict(model.state_dict())
    return twin.eval()


def test_without_shift_it_is_a_framewise_vit_with_class_tokens_averaged_over_time():
    model = tiny(token_shift=False).eval()
    vit = VisionTransformer(patch_size=16, num_classes=7, **TINY).eval()
    missing, unexpected = vit.load_state_dict(model.state_dict(), strict=False)
    assert missing == ["head.weight", "head.bias"] and all(k.startswith("heads.") for k in unexpected)
    vit.head.load_state_dict(model.heads["k400"].state_dict())
    clip = torch.randn(2, 4, 3, 32, 32)
    class_tokens = torch.stack([vit.forward_features(clip[:, t])[:, 0] for t in range(4)], dim=1)
    torch.testing.assert_close(model(clip, dataset="k400"), vit.head(class_tokens.mean(dim=1)))


def frame_index_tokens(frames=5, tokens=3, channels=16):
    """(frames, tokens, channels) whose value is the frame index everywhere, plus 100 on patch tokens."""
    x = torch.arange(frames, dtype=torch.float).view(frames, 1, 1).expand(frames, tokens, channels).clone()
    x[:, 1:] += 100
    return x


@pytest.mark.parametrize("fold_div", [8, 4])
def test_class_token_shift_takes_one_fold_from_the_next_frame_and_one_from_the_previous(fold_div):
    block = TokenShiftBlock(dim=16, num_heads=2, fold_div=fold_div)
    x = frame_index_tokens()
    y = block._shift_class_token(x, num_frames=5)
    fold = 16 // fold_div
    t = torch.arange(5, dtype=torch.float)
    future = torch.where(t < 4, t + 1, 0.0)             # zeros past the last frame
    past = torch.where(t > 0, t - 1, 0.0)               # zeros before the first frame
    torch.testing.assert_close(y[:, 0, :fold], future.view(5, 1).expand(5, fold))
    torch.testing.assert_close(y[:, 0, fold:2 * fold], past.view(5, 1).expand(5, fold))
    torch.testing.assert_close(y[:, 0, 2 * fold:], x[:, 0, 2 * fold:])
    torch.testing.assert_close(y[:, 1:], x[:, 1:])      # patch tokens never move


def test_shift_happens_before_each_layer_norm_of_every_block():
    model = tiny().eval()
    block = model.blocks[0]
    for branch in (block.attn.proj, block.mlp.fc2):      # silence both branches: only the shifts act
        torch.nn.init.zeros_(branch.weight)
        torch.nn.init.zeros_(branch.bias)
    seen = {}
    block.norm1.register_forward_pre_hook(lambda m, a: seen.setdefault("norm1", a[0]))
    block.norm2.register_forward_pre_hook(lambda m, a: seen.setdefault("norm2", a[0]))
    x = frame_index_tokens(frames=4, tokens=5, channels=32)
    out = block(x, num_frames=4)
    fold = 32 // 8
    assert seen["norm1"][:, 0, :fold].flatten(1).mean(1).tolist() == [1, 2, 3, 0]
    assert seen["norm2"][:, 0, :fold].flatten(1).mean(1).tolist() == [2, 3, 0, 0]   # shifted twice
    assert seen["norm2"][:, 0, fold:2 * fold].flatten(1).mean(1).tolist() == [0, 0, 0, 1]
    torch.testing.assert_close(out, seen["norm2"])      # the residual stream carries the shifted tokens


def test_image_batches_and_single_frames_pass_unshifted():
    model = tiny().eval()
    plain = with_same_weights(model, token_shift=False)
    images = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(model(images, dataset="imagenet"), plain(images, dataset="imagenet"))
    torch.testing.assert_close(model(images[:, None]), plain(images[:, None]))
    clip = torch.randn(2, 4, 3, 32, 32)
    assert not torch.allclose(model(clip), plain(clip))   # with frames, the shift acts


def test_each_dataset_has_its_own_head_over_shared_features():
    model = tiny().eval()
    clip = torch.randn(2, 4, 3, 32, 32)
    assert model(clip, dataset="k400").shape == (2, 7)
    assert model(clip, dataset="imagenet").shape == (2, 3)
    torch.testing.assert_close(model(clip), model(clip, dataset="k400"))   # the first head is the default
    before = model(clip, dataset="k400")
    torch.nn.init.normal_(model.heads["imagenet"].weight)
    torch.testing.assert_close(model(clip, dataset="k400"), before)
    with pytest.raises(KeyError, match="no head for dataset 'ssv2'"):
        model(clip, dataset="ssv2")


def test_forward_and_backward_train_the_backbone_and_only_the_used_head():
    model = tiny()
    loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 4, 3, 32, 32), dataset="k400"),
                                             torch.tensor([0, 6]))
    loss.backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.heads["k400"].weight.grad.abs().sum() > 0
    assert model.heads["imagenet"].weight.grad is None


def test_pretrained_vit_checkpoint_loads_with_its_position_embedding_resized(tmp_path):
    vit = VisionTransformer(patch_size=16, num_classes=1000, **TINY)
    path = tmp_path / "vit.pth"
    torch.save({"model": vit.state_dict()}, path)
    model = tiny(img_size=48, pretrained=str(path))
    assert model.pos_embed.shape == (1, 1 + 9, 32)
    torch.testing.assert_close(model.pos_embed[:, 0], vit.pos_embed[:, 0])
    torch.testing.assert_close(model.blocks[1].mlp.fc1.weight, vit.blocks[1].mlp.fc1.weight)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"images \(B, 3, H, W\) or clips"):
        tiny()(torch.randn(2, 32, 32))
    with pytest.raises(ValueError, match="BTCHW"):
        tiny()(torch.randn(2, 3, 4, 32, 32))


def test_cost_is_sixteen_frames_of_vit_b_and_the_shift_is_free():
    with torch.device("meta"):
        vit = VisionTransformer(num_classes=400).eval()
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            vit.forward_features(torch.zeros(1, 3, 224, 224))
    per_frame = counter.get_total_flops() / 2 / 1e9
    head = 768 * 400 / 1e9
    params, gflops = count("ivvit_base_patch16_224", 16, 224)
    assert gflops == pytest.approx(16 * per_frame + head, rel=1e-9)
    assert params == pytest.approx(sum(p.numel() for p in vit.parameters()) / 1e6, rel=1e-9)
