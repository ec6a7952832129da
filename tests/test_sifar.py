"""SIFAR: super images in front of Swin and ResNet classifiers, specified on tiny real models."""
from __future__ import annotations

import pytest
import torch
from einops import rearrange

from models import build, get_spec, list_models
from models.describe import count
from models.sifar import SwinSIFAR

# Tiny Swin: 64 px frames, windows of 2 tokens tile the 48/24/12 maps of a 3x3 super image (and the
# 64/32/16 maps of a 4x4 one); the last stage (6x6 or 8x8) is global unless the config says otherwise.
TINY_SWIN = dict(img_size=64, embed_dim=24, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=2)
TINY_RESNET = dict(img_size=32, channels=(8, 16, 32, 64), layers=(1, 1, 1, 1))
SWIN_NAMES = [n for n in list_models("sifar") if n.startswith(("sifar_base", "sifar_large"))]
RESNET_NAMES = [n for n in list_models("sifar") if n.startswith("sifar_resnet") and "152x2" not in n]
PAPER_GFLOPS = [n for n in list_models("sifar") if "gflops" in get_spec(n).paper]


def tiny(name: str, num_classes: int = 5, **options):
    options.setdefault("num_frames", get_spec(name).paper["frames"])
    base = TINY_SWIN if name in SWIN_NAMES else TINY_RESNET
    return build(name, num_classes=num_classes, **{**base, **options})


def clip(model, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, model.num_frames, 3, model.frame_size, model.frame_size)


@pytest.mark.parametrize("name", SWIN_NAMES + RESNET_NAMES)
def test_every_config_trains_on_frames_and_on_super_images(name):
    model = tiny(name)
    frames = clip(model)
    for x in (frames, model.super_image(frames)):
        logits = model(x)
        assert logits.shape == (2, 5)
        logits.logsumexp(-1).mean().backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        model.zero_grad()


def test_resnet152x2_takes_both_input_forms():
    # 236 M parameters: checked on the meta device, where shapes propagate without memory or time.
    with torch.device("meta"):
        model = build("sifar_resnet152x2", num_classes=7)
        frames = torch.zeros(2, 8, 3, 224, 224)
        assert model(frames).shape == model(model.super_image(frames)).shape == (2, 7)


@pytest.mark.parametrize("name", ["sifar_base_14_8x224", "sifar_resnet50_c21_11"])
def test_frames_and_the_tiled_super_image_give_the_same_logits(name):
    model = tiny(name).eval()
    frames = clip(model)
    with torch.no_grad():
        torch.testing.assert_close(model(frames), model(model.super_image(frames)))


def test_super_image_puts_frame_f_at_row_f_div_cols_and_leaves_blank_tiles_zero():
    model = tiny("sifar_base_14_8x224", num_frames=7, frame_pos_embed=True)
    assert model.super_grid == (3, 3) and model.super_image_size == (192, 192)
    frames = torch.rand(2, 7, 3, 64, 64) + 0.5  # strictly positive, so a zero tile can only be a blank
    tiles = rearrange(model.super_image(frames), "b c (r h) (q w) -> b (r q) c h w", r=3, q=3)
    torch.testing.assert_close(tiles[:, :7], frames)
    assert (tiles[:, 7:] == 0).all()


def test_swin_uses_the_window_of_each_stage_and_a_global_unshifted_last_stage():
    model = tiny("sifar_base_14_8x224")
    assert model.stage_windows == [(2, 2), (2, 2), (2, 2), (6, 6)]
    assert [stage.output_resolution for stage in model.layers] == [(48, 48), (24, 24), (12, 12), (6, 6)]
    assert [stage.blocks[1].shift_size for stage in model.layers] == [(1, 1), (1, 1), (1, 1), (0, 0)]
    last = model.layers[-1].blocks
    assert all(block.attn_mask is None for block in last)
    assert last[0].attn.relative_position_bias_table.shape[0] == (2 * 6 - 1) ** 2


def test_sifar_b7_keeps_shifted_local_windows_in_its_last_stage():
    model = tiny("sifar_base_7_8x224", window_size=3)
    assert model.stage_windows == [(3, 3)] * 4
    assert model.layers[-1].blocks[1].shift_size == (1, 1)
    assert model.layers[-1].blocks[1].attn_mask is not None


@pytest.mark.parametrize("name, windows", [
    ("sifar_base_7_8x224", (7, 7, 7, 7)), ("sifar_base_12_8x192", (12, 12, 12, 18)),
    ("sifar_base_14_8x224", (14, 14, 14, 21)), ("sifar_base_12_16x192", (12, 12, 12, 24)),
    ("sifar_base_14_16x224", (14, 14, 14, 28)), ("sifar_base_12_8x384", (12, 12, 12, 36)),
])
def test_registered_configs_have_the_windows_of_the_papers_table_1(name, windows):
    spec = get_spec(name)
    with torch.device("meta"):
        model = build(name, num_classes=400, num_frames=spec.paper["frames"], img_size=spec.paper["img_size"])
    assert model.stage_windows == [(w, w) for w in windows]


def test_windows_that_do_not_tile_their_stage_are_reported():
    with pytest.warns(UserWarning, match="window 12x12 does not tile its 42x42 map"), torch.device("meta"):
        build("sifar_base_12_8x192", num_classes=400, img_size=224)


def test_frame_pos_embed_adds_one_vector_per_tile_to_all_its_tokens():
    model = tiny("sifar_base_14_8x224", frame_pos_embed=True).eval()
    entering = {}
    model.layers.register_forward_pre_hook(lambda _, args: entering.setdefault("tokens", args[0]))
    frames = clip(model, batch=1)
    with torch.no_grad():
        model(frames)
        added = entering["tokens"] - model.patch_embed(model.super_image(frames))
    per_tile = rearrange(added[0], "(r h) (q w) c -> (r q) (h w) c", r=3, q=3)  # 16x16 tokens per tile
    torch.testing.assert_close(per_tile, model.frame_pos_embed.detach()[:, None].expand_as(per_tile))
    assert model.frame_pos_embed.shape == (9, 24)


def test_frame_pos_embed_is_off_by_default_and_free_of_weight_decay():
    assert tiny("sifar_base_14_8x224").frame_pos_embed is None
    assert "frame_pos_embed" in tiny("sifar_base_14_8x224", frame_pos_embed=True).no_weight_decay()


@pytest.mark.parametrize("shape", [(2, 6, 3, 64, 64), (2, 8, 3, 32, 32), (2, 3, 64, 64), (2, 3, 192)])
def test_inputs_of_the_wrong_shape_are_refused_with_the_expected_shapes(shape):
    model = tiny("sifar_base_14_8x224")
    with pytest.raises(ValueError, match=r"expects .*\(B, 8, C, 64, 64\)"):
        model(torch.zeros(shape))


def test_frame_size_must_be_a_multiple_of_the_patch_size():
    with pytest.raises(ValueError, match="img_size 62 is not a multiple of the patch size 4"):
        tiny("sifar_base_14_8x224", img_size=62)


def test_models_tell_the_loader_their_layout_and_grid():
    model = tiny("sifar_base_14_16x224", num_classes=3)
    assert (model.layout, model.super_grid, model.super_image_size) == ("super", (4, 4), (256, 256))


@pytest.mark.parametrize("name, kernels", [
    ("sifar_resnet50", []), ("sifar_resnet50_c7", [7]), ("sifar_resnet50_c11", [11]),
    ("sifar_resnet50_c21", [21]), ("sifar_resnet50_c21_11", [21, 11]), ("sifar_resnet101_c21_11", [21, 11]),
])
def test_resnet_variants_append_bottlenecks_whose_middle_conv_has_the_papers_kernel(name, kernels):
    with torch.device("meta"):
        model = build(name, num_classes=400)
    assert [block.conv2.kernel_size for block in model.extra] == [(k, k) for k in kernels]
    for block in model.extra:  # ResNet's own bottleneck widths at the last stage: 2048 -> 512 -> 2048
        assert (block.conv1.in_channels, block.conv2.in_channels, block.conv3.out_channels) == (2048, 512, 2048)
        assert block.conv2.padding == (block.conv2.kernel_size[0] // 2,) * 2


def test_appended_blocks_start_as_the_identity():
    model = tiny("sifar_resnet50_c21_11").eval()
    frames = clip(model)
    with torch.no_grad():
        backbone_only = model.net.forward_features(model.super_image(frames))
        torch.testing.assert_close(model.forward_features(frames), backbone_only)


@pytest.mark.parametrize("name", PAPER_GFLOPS)
def test_gflops_and_params_match_the_paper_within_5_percent(name):
    paper = get_spec(name).paper
    params, gflops = count(name, paper["frames"], paper["img_size"])
    assert abs(gflops - paper["gflops"]) <= 0.05 * paper["gflops"], (gflops, paper["gflops"])
    assert abs(params - paper["params_m"]) <= 0.05 * paper["params_m"], (params, paper["params_m"])


def test_build_loads_an_image_swin_checkpoint_into_larger_windows(tmp_path):
    image_swin = SwinSIFAR(num_frames=1, frame_size=192, window_size=3, global_last=False, num_classes=10,
                           embed_dim=24, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4))
    torch.save({"model": image_swin.state_dict()}, tmp_path / "swin.pth")
    model = tiny("sifar_base_14_8x224", window_size=12, pretrained=str(tmp_path / "swin.pth"))
    assert model.stage_windows == [(12, 12), (12, 12), (12, 12), (6, 6)]
    torch.testing.assert_close(model.layers[2].blocks[0].mlp.fc1.weight, image_swin.layers[2].blocks[0].mlp.fc1.weight)
    table = model.layers[0].blocks[0].attn.relative_position_bias_table
    assert table.shape == ((2 * 12 - 1) ** 2, 1)
    assert not torch.equal(model.head.fc.weight[:5], image_swin.head.fc.weight[:5])  # 10 classes vs 5: not loaded


def test_a_non_square_grid_gets_a_non_square_global_window():
    model = tiny("sifar_base_14_8x224", grid="2x4")
    assert model.super_image_size == (128, 256)
    assert model.stage_windows == [(2, 2), (2, 2), (2, 2), (4, 8)]
    assert model(clip(model)).shape == (2, 5)


def test_resnet_takes_image_weights_into_its_backbone_and_sifar_weights_whole(tmp_path):
    import timm

    image = timm.create_model("resnet50", num_classes=10, channels=(8, 16, 32, 64), layers=(1, 1, 1, 1))
    torch.save(image.state_dict(), tmp_path / "image.pth")
    model = tiny("sifar_resnet50_c21", pretrained=str(tmp_path / "image.pth"))
    torch.testing.assert_close(model.net.conv1.weight, image.conv1.weight)
    torch.nn.init.normal_(model.extra[0].conv2.weight)
    torch.save({"model": model.state_dict()}, tmp_path / "sifar.pth")
    again = tiny("sifar_resnet50_c21", pretrained=str(tmp_path / "sifar.pth"))
    torch.testing.assert_close(again.extra[0].conv2.weight, model.extra[0].conv2.weight)
    torch.testing.assert_close(again.net.fc.weight, model.net.fc.weight)
