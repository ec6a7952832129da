"""The spatio-temporal layers of the unified CNN framework, on tensors whose values are their frame numbers."""
import pytest
import torch

from models.temporal import (FrameHead, NonLocal, TemporalAggregation, TemporalMaxPool, TemporalShift,
                             r2plus1d_mid_channels, shift_time)


def frame_numbered(b=2, t=6, c=16, h=3, w=3):
    """(B, T, C, H, W) whose every value is 1 + its frame index, so a zero can only come from padding."""
    return (torch.arange(t, dtype=torch.float32) + 1).view(1, t, 1, 1, 1).expand(b, t, c, h, w).contiguous()


def test_shift_time_reads_the_offset_frame_and_pads_with_zeros():
    x = frame_numbered(t=5)
    ahead = shift_time(x, +1)
    assert torch.equal(ahead[:, :4], x[:, 1:]) and ahead[:, 4].abs().sum() == 0
    behind = shift_time(x, -2)
    assert torch.equal(behind[:, 2:], x[:, :3]) and behind[:, :2].abs().sum() == 0


def test_tsm_first_eighth_takes_next_frame_second_eighth_previous_frame_rest_stays():
    t, c = 6, 16
    x = frame_numbered(t=t, c=c)
    out = TemporalShift(fold_div=8)(x)
    frame = out[0, :, :, 0, 0]  # (T, C): the value each channel holds at each frame
    for i in range(t):
        expected_future = i + 2 if i < t - 1 else 0   # frame i+1's value, zero past the last frame
        expected_past = i if i > 0 else 0             # frame i-1's value, zero before the first frame
        assert frame[i, :2].tolist() == [expected_future] * 2
        assert frame[i, 2:4].tolist() == [expected_past] * 2
        assert frame[i, 4:].tolist() == [i + 1] * (c - 4)


def test_tsm_moves_exactly_a_quarter_of_channels_with_default_fold():
    x = torch.randn(1, 4, 64, 2, 2)
    out = TemporalShift()(x)
    changed = (out != x).flatten(3).any(-1).any(0).any(0)  # per channel: changed at any frame
    assert changed.nonzero().flatten().tolist() == list(range(16))
    assert sum(p.numel() for p in TemporalShift().parameters()) == 0


@pytest.mark.parametrize("kernel,offset", [((1, 0, 0), -1), ((0, 1, 0), 0), ((0, 0, 1), +1)])
def test_tam_with_one_hot_kernel_equals_a_shift(kernel, offset):
    tam = TemporalAggregation(channels=16)
    tam.set_kernel(*kernel)
    x = torch.rand(2, 5, 16, 4, 4)  # non-negative: TAM's closing ReLU leaves it alone
    assert torch.allclose(tam(x), shift_time(x, offset))


def test_tam_blends_only_adjacent_frames_per_channel():
    tam = TemporalAggregation(channels=4)
    x = torch.zeros(1, 7, 4, 2, 2)
    x[:, 3, 1] = 1.0  # an impulse at frame 3, channel 1
    with torch.no_grad():
        tam.blend.weight.copy_(torch.rand_like(tam.blend.weight) + 0.1)
    out = tam(x)
    touched_frames = out.flatten(2).abs().sum(-1)[0].nonzero().flatten().tolist()
    touched_channels = out.transpose(1, 2).flatten(2).abs().sum(-1)[0].nonzero().flatten().tolist()
    assert touched_frames == [2, 3, 4] and touched_channels == [1]
    assert sum(p.numel() for p in tam.parameters()) == 3 * 4


def test_temporal_max_pool_halves_time_taking_the_window_maximum():
    x = frame_numbered(t=8)
    out = TemporalMaxPool()(x)
    assert out.shape[1] == 4
    # window of output frame j covers frames 2j-1, 2j, 2j+1 -> the largest frame number is 2j+2 (capped at 8)
    assert out[0, :, 0, 0, 0].tolist() == [2, 4, 6, 8]
    assert TemporalMaxPool()(frame_numbered(t=5)).shape[1] == 3


def test_non_local_block_starts_as_identity_then_attends_across_all_frames():
    torch.manual_seed(0)
    block = NonLocal(8).eval()
    x = torch.randn(1, 8, 5, 4, 4)
    assert torch.equal(block(x), x)
    with torch.no_grad():
        block.bn.weight.fill_(1.0)
    y = block(x)
    x2 = x.clone()
    x2[:, :, 0] += 1.0  # change only the first frame
    moved = (block(x2) - y)[:, :, -1].abs().max()
    assert moved > 1e-4  # the last frame feels it: the receptive field is the whole clip


def test_non_local_gives_the_same_answer_in_both_layouts():
    torch.manual_seed(0)
    clip_major, frame_major = NonLocal(8, time_dim=2).eval(), NonLocal(8, time_dim=1).eval()
    with torch.no_grad():
        clip_major.bn.weight.fill_(1.0)
    frame_major.load_state_dict(clip_major.state_dict())
    x = torch.randn(2, 8, 4, 4, 4)
    assert torch.allclose(frame_major(x.transpose(1, 2)).transpose(1, 2), clip_major(x), atol=1e-6)


def test_r2plus1d_middle_width_keeps_a_full_3d_conv_parameter_count():
    for cin, cout in [(64, 64), (128, 256), (3, 64)]:
        mid = r2plus1d_mid_channels(cin, cout)
        factorised = cin * mid * 9 + mid * cout * 3
        full = cin * cout * 27
        one_mid_channel = cin * 9 + cout * 3  # the formula floors M, so it may fall short by one channel
        assert 0 <= full - factorised < one_mid_channel
    assert r2plus1d_mid_channels(64, 64) == 144


def test_frame_head_averages_the_logits_of_every_time_step():
    head = FrameHead(8, 5).eval()
    feature_map = torch.randn(3, 6, 8, 2, 2)  # (B, T, C, H, W)
    per_step = torch.stack([head.fc(feature_map[:, i].mean((-2, -1))) for i in range(6)], 1)
    assert torch.allclose(head(feature_map), per_step.mean(1), atol=1e-6)
    clip_head = FrameHead(8, 5, layout="BCTHW").eval()
    clip_head.load_state_dict(head.state_dict())
    assert torch.allclose(clip_head(feature_map.transpose(1, 2)), head(feature_map), atol=1e-6)
