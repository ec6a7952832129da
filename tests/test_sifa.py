"""SIFA block, SIFA-Net and SIFA-Transformer: the paper's equations on tiny tensors, structure, cost, weights."""
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.resnet import ResNet, Bottleneck
from torch.utils.flop_counter import FlopCounterMode

import models
from models.describe import count
from models.sifa import SIFA, sample_neighbourhood, unfold_neighbourhood

T = 4


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def clips(b=2, t=T, c=6, h=5, w=7):
    return torch.randn(b, t, c, h, w)


def next_frames(x):
    """Frame t+1 for every t; the last frame is its own next frame."""
    return torch.cat([x[:, 1:], x[:, -1:]], dim=1)


def prev_frames(x):
    return torch.cat([x[:, :1], x[:, :-1]], dim=1)


def reference_attention(query, frame, k):
    """Softmax(q.k) weighted sum over the zero-padded k x k neighbourhood, written out neighbour by neighbour."""
    r = k // 2
    h, w = query.shape[-2:]
    padded = F.pad(frame, (r, r, r, r))
    keys = [padded[..., r + dy:r + dy + h, r + dx:r + dx + w] for dy in range(-r, r + 1) for dx in range(-r, r + 1)]
    weights = torch.stack([(query * key).sum(dim=-3) for key in keys], dim=-3).softmax(dim=-3)
    return sum(weights[..., j:j + 1, :, :] * key for j, key in enumerate(keys))


def run_block(block, x):
    return block(x.flatten(0, 1)).view_as(x)


def tiny_sifa_net(name="sifa_r50", frames=8, **options):
    return models.build(name, num_classes=5, num_frames=frames, img_size=32, temporal_stride=2, layers=(1, 2, 1, 1),
                        channels=(8, 16, 16, 16), **options)


def tiny_swin_options():
    return dict(img_size=32, temporal_stride=2, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4)


# --- sampling ----------------------------------------------------------------------------------------------

def test_bilinear_sampling_with_zero_offsets_reads_the_regular_grid():
    f = torch.randn(3, 4, 5, 7)
    for k in (1, 3, 5):
        offsets = torch.zeros(3, 2 * k * k, 5, 7)
        torch.testing.assert_close(sample_neighbourhood(f, offsets, k), unfold_neighbourhood(f, k))


def test_offsets_are_dy_dx_pairs_in_pixels():
    f = torch.randn(1, 2, 4, 6)
    right = torch.zeros(1, 2, 4, 6)
    right[:, 1] = 1.0                                   # dx = +1: read the pixel to the right
    out = sample_neighbourhood(f, right, 1)[:, :, 0]
    torch.testing.assert_close(out[..., :-1], f[..., 1:])
    assert out[..., -1].abs().max() == 0                # outside the map reads zeros
    half_down = torch.zeros(1, 2, 4, 6)
    half_down[:, 0] = 0.5                               # dy = +0.5: halfway to the row below
    out = sample_neighbourhood(f, half_down, 1)[:, :, 0]
    torch.testing.assert_close(out[..., :-1, :], (f[..., :-1, :] + f[..., 1:, :]) / 2)


# --- the block ---------------------------------------------------------------------------------------------

def test_k1_with_zero_offsets_adds_the_co_located_next_frame():
    x = clips()
    block = SIFA(6, T, kernel_size=1)               # deformable, offset conv zero-initialised
    assert block.offset_next.weight.abs().max() == 0
    torch.testing.assert_close(run_block(block, x), x + next_frames(x))


def test_k1_linear_correlation_is_the_per_pixel_dot_product_over_channels():
    x = clips()
    block = SIFA(6, T, kernel_size=1, attn_norm="linear")
    nxt = next_frames(x)
    corr = (x * nxt).sum(dim=2, keepdim=True) / 6
    torch.testing.assert_close(run_block(block, x), x + corr * nxt)


def test_regular_grid_block_matches_softmax_attention_over_next_frame_neighbours():
    x = clips()
    block = SIFA(6, T, kernel_size=3, deformable=False)
    expected = x + reference_attention(x, next_frames(x), 3)
    torch.testing.assert_close(run_block(block, x), expected)


def test_last_frame_attends_to_itself():
    x = clips()
    y = run_block(SIFA(6, T, kernel_size=3), x)
    last = x[:, -1]
    torch.testing.assert_close(y[:, -1], last + reference_attention(last, last, 3))


def test_released_last_frame_option_gives_the_last_frame_no_inter_frame_term():
    x = clips()
    y = run_block(SIFA(6, T, kernel_size=3, last_frame="zero"), x)
    torch.testing.assert_close(y[:, -1], x[:, -1])
    torch.testing.assert_close(y[:, 0], x[:, 0] + reference_attention(x[:, 0], x[:, 1], 3))


def test_scaled_softmax_divides_the_correlation_by_sqrt_channels():
    x = clips()
    block = SIFA(6, T, kernel_size=3, deformable=False, attn_norm="scaled_softmax")
    expected = x + reference_attention(x / 6 ** 0.5, next_frames(x), 3)
    torch.testing.assert_close(run_block(block, x), expected)


def test_deformable_block_starts_on_the_regular_grid():
    x = clips()
    torch.testing.assert_close(run_block(SIFA(6, T, kernel_size=3), x),
                               run_block(SIFA(6, T, kernel_size=3, deformable=False), x))


def test_offsets_come_from_the_motion_saliency_of_the_next_frame():
    x = clips()
    block = SIFA(6, T, kernel_size=1)
    seen = {}
    block.offset_next.register_forward_pre_hook(lambda m, args: seen.setdefault("input", args[0]))
    run_block(block, x)
    nxt = next_frames(x)
    torch.testing.assert_close(seen["input"], (torch.sigmoid(nxt - x) * nxt).flatten(0, 1))


def test_gradients_reach_the_offset_conv():
    x = clips().requires_grad_()
    block = SIFA(6, T, kernel_size=3)
    run_block(block, x).square().sum().backward()
    assert block.offset_next.weight.grad.abs().sum() > 0
    assert x.grad.abs().sum() > 0


def test_sifa_r_has_no_offset_conv():
    assert SIFA(6, T, deformable=False).offset_next is None
    net = tiny_sifa_net("sifa_r_r50")
    sifas = [m for m in net.modules() if isinstance(m, SIFA)]
    assert sifas and all(m.offset_next is None and m.offset_prev is None for m in sifas)
    assert not [n for n, _ in net.named_parameters() if "offset" in n]


def test_sifa_star_attends_to_both_neighbours():
    x = clips()
    block = SIFA(6, T, kernel_size=1, bidirectional=True)
    assert block.offset_prev is not None
    torch.testing.assert_close(run_block(block, x), x + next_frames(x) + prev_frames(x))
    block3 = SIFA(6, T, kernel_size=3, bidirectional=True, deformable=False)
    expected = x + reference_attention(x, next_frames(x), 3) + reference_attention(x, prev_frames(x), 3)
    torch.testing.assert_close(run_block(block3, x), expected)


def test_block_rejects_a_batch_that_does_not_hold_whole_clips():
    with pytest.raises(ValueError, match="multiple of 4"):
        SIFA(6, T)(torch.randn(6, 6, 5, 5))


# --- SIFA-Net ----------------------------------------------------------------------------------------------

def test_sifa_net_forward_and_backward():
    net = tiny_sifa_net(zero_init_last=False)   # timm zero-inits each branch's last BN, which blocks gradients at first
    logits = net(torch.randn(2, 8, 3, 32, 32))
    assert logits.shape == (2, 5)
    F.cross_entropy(logits, torch.tensor([1, 3])).backward()
    offsets = [m.offset_next.weight.grad for m in net.modules() if isinstance(m, SIFA)]
    assert offsets and all(g is not None and g.abs().sum() > 0 for g in offsets)


def test_sifa_follows_the_3x3_conv_of_every_res3_to_res5_bottleneck():
    net = tiny_sifa_net()
    assert not [m for m in net.layer1.modules() if isinstance(m, SIFA)]
    for stage in (net.layer2, net.layer3, net.layer4):
        for block in stage:
            assert isinstance(block.act2.sifa, SIFA)
            assert block.act2.sifa.num_frames == 4            # 8 frames, temporal stride 2
            assert block.act2.sifa.offset_next.in_channels == block.conv2.out_channels


def test_stem_strides_time_and_rejects_clips_it_cannot_stride():
    net = tiny_sifa_net()
    assert net.conv1.kernel_size == (2, 7, 7) and net.conv1.stride == (2, 2, 2)
    assert net.forward_features(torch.randn(1, 8, 3, 32, 32)).shape[0] == 4
    with pytest.raises(ValueError, match="multiple of temporal_stride"):
        tiny_sifa_net(frames=7)
    with pytest.raises(ValueError, match="built for 8 frames"):
        net(torch.randn(1, 4, 3, 32, 32))


def test_released_layout_alternates_sifa_with_clip_context_and_adds_a_dual_res5():
    net = tiny_sifa_net("sifa_r50_released")
    stage = net.layer2
    assert not hasattr(stage[0].act2, "sifa") and stage[0].se is not None
    assert isinstance(stage[1].act2.sifa, SIFA) and stage[1].act2.sifa.attn_norm == "linear"
    assert net.layer4_dual[0].conv2.stride == (1, 1)
    assert net(torch.randn(2, 8, 3, 32, 32)).shape == (2, 5)


def _macs(model, x):
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 2 / 1e9


def sifa_macs(name, frames=16, size=224):
    """What the blocks should cost, from the shapes they see: offset conv (3x3, C -> 2k^2) + q.k + weighted sum."""
    total = 0
    with torch.device("meta"):
        net = models.build(name, num_classes=400, num_frames=frames, img_size=size).eval()

        def counted(block):
            def inter_frame(x):
                nonlocal total
                n, c, h, w = x.shape
                kk = block.kernel_size ** 2
                total += n * h * w * (c * 9 * 2 * kk + 2 * c * kk)
                return SIFA.inter_frame(block, x)
            return inter_frame

        for m in net.modules():
            if isinstance(m, SIFA):
                m.inter_frame = counted(m)
        with torch.no_grad():
            net(torch.zeros(1, frames, 3, size, size))
    return total / 1e9


def test_sifa_r50_costs_four_feature_frames_of_resnet50_plus_the_blocks():
    with torch.device("meta"):
        r50 = timm.create_model("resnet50", num_classes=400).eval()
        image = _macs(r50, torch.zeros(1, 3, 224, 224))
        stem = _macs(r50.conv1, torch.zeros(1, 3, 224, 224))
        fc = _macs(r50.fc, torch.zeros(1, 2048))
    # 16 frames -> 4 at the stem: 4 images through the body, while the 4x7x7 stem sees all 16 frames;
    # one classifier per clip.
    backbone = 4 * (image - stem - fc) + 16 * stem + fc
    assert count("sifa_r50", 16, 224)[1] == pytest.approx(backbone + sifa_macs("sifa_r50"), rel=1e-6)


def test_released_sifa_net_costs_the_papers_25_gflops():
    paper = models.get_spec("sifa_r50_released").paper["gflops"]
    assert paper == 25
    assert abs(count("sifa_r50_released", 16, 224)[1] - paper) < 0.05 * paper


def test_image_resnet_checkpoint_loads_with_the_stem_inflated(tmp_path):
    source = ResNet(Bottleneck, (1, 2, 1, 1), channels=(8, 16, 16, 16), num_classes=5)
    path = tmp_path / "resnet.pth"
    torch.save(source.state_dict(), path)
    net = tiny_sifa_net("sifa_r50_released", pretrained=str(path))
    assert net.conv1.weight.shape == (64, 3, 2, 7, 7)
    torch.testing.assert_close(net.conv1.weight[:, :, 1], source.conv1.weight)
    assert net.conv1.weight[:, :, 0].abs().max() == 0
    torch.testing.assert_close(net.layer3[0].conv2.weight, source.layer3[0].conv2.weight)
    torch.testing.assert_close(net.layer4_dual[0].conv1.weight, source.layer4[0].conv1.weight)
    torch.testing.assert_close(net.fc.weight, source.fc.weight)


# --- SIFA-Transformer --------------------------------------------------------------------------------------

def test_sifa_transformer_forward_and_backward():
    net = models.build("sifa_swin_t", num_classes=5, num_frames=8, **tiny_swin_options())
    logits = net(torch.randn(2, 8, 3, 32, 32))
    assert logits.shape == (2, 5)
    logits.sum().backward()
    offsets = [m.offset_next.weight.grad for m in net.modules() if isinstance(m, SIFA)]
    assert len(offsets) == 3 and all(g.abs().sum() > 0 for g in offsets)


def test_sifa_sits_in_every_block_whose_windows_are_not_shifted():
    net = models.build("sifa_swin_t", num_classes=5, num_frames=8, **tiny_swin_options())
    first, last = net.layers          # 8x8 map with 4x4 windows, then a 4x4 map: one window, nothing to shift
    assert [bool(any(b.shift_size)) for b in first.blocks] == [False, True]
    assert [bool(any(b.shift_size)) for b in last.blocks] == [False, False]
    has_sifa = [[any(isinstance(m, SIFA) for m in b.modules()) for b in stage.blocks] for stage in net.layers]
    assert has_sifa == [[True, False], [True, True]]   # the authors' rule: both blocks of the one-window stage


def test_the_tubelet_embedding_feeds_the_blocks_without_a_layer_norm_unless_patch_norm_is_asked():
    x = torch.randn(1, 8, 3, 32, 32)
    for patch_norm in (False, True):
        net = models.build("sifa_swin_t", num_classes=5, num_frames=8, patch_norm=patch_norm,
                           **tiny_swin_options()).eval()
        seen = []
        net.layers.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        net(x)
        tokens = net.patch_embed.proj(x.transpose(1, 2)).permute(0, 2, 3, 4, 1).flatten(0, 1)   # (B*T', H, W, C)
        expected = F.layer_norm(tokens, (16,), net.patch_embed.norm.weight, net.patch_embed.norm.bias) \
            if patch_norm else tokens
        torch.testing.assert_close(seen[0], expected)
        assert ("patch_embed.norm.weight" in net.state_dict()) == patch_norm


def test_swin_checkpoint_loads_and_a_fresh_zero_norm_sifa_transformer_with_patch_norm_is_the_image_swin_per_frame(
        tmp_path):
    swin = timm.models.swin_transformer.SwinTransformer(
        img_size=32, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4, num_classes=5).eval()
    path = tmp_path / "swin.pth"
    torch.save(swin.state_dict(), path)
    net = models.build("sifa_swin_t", num_classes=5, num_frames=4, pretrained=str(path), out_norm=True,
                       patch_norm=True, **tiny_swin_options()).eval()
    frames = torch.randn(2, 2, 3, 32, 32)
    clip = frames.repeat_interleave(2, dim=1)            # each of 2 images held for 2 frames: stride 2 sees each once
    expected = swin.head.fc(torch.stack([swin.forward_head(swin.forward_features(frames[:, i]), pre_logits=True)
                                         for i in range(2)], 1).mean(1))
    torch.testing.assert_close(net(clip), expected, atol=1e-5, rtol=1e-5)


def test_sifa_swin_costs_four_frames_of_swin_plus_the_blocks():
    with torch.device("meta"):
        swin = timm.create_model("swin_tiny_patch4_window7_224", num_classes=400).eval()
        image = _macs(swin, torch.zeros(1, 3, 224, 224))
        stem = _macs(swin.patch_embed.proj, torch.zeros(1, 3, 224, 224))
        fc = _macs(swin.head.fc, torch.zeros(1, 768))
    backbone = 4 * (image - stem - fc) + 16 * stem + fc
    assert count("sifa_swin_t", 16, 224)[1] == pytest.approx(backbone + sifa_macs("sifa_swin_t"), rel=1e-6)
