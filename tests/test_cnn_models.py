"""The unified 2D/3D CNN framework: every registered net trains on a tiny clip, and its architecture matches
the paper's (and the reference code's) parameter and FLOP counts."""
import pytest
import torch

from models.describe import count
from models.inception_video import INCEPTIONS, VideoInception
from models.registry import build, get_spec, list_models
from models.resnet_video import VideoResNet
from models.temporal import NonLocal, TemporalAggregation, TemporalShift

CNN_MODELS = list_models(family="cnn")
TINY = dict(width_mult=0.125)


def clip(layout, b=2, t=4, size=32):
    x = torch.randn(b, t, 3, size, size)
    return x if layout == "BTCHW" else x.transpose(1, 2).contiguous()


def test_the_framework_registers_every_method_on_both_backbones():
    for method in ("tsn", "tsm", "tam", "i3d", "r3d", "s3d", "r2plus1d"):
        assert {f"{method}_r{d}" for d in (18, 34, 50, 101)} <= set(CNN_MODELS)
    assert {"tsn_inception", "tsm_inception", "tam_inception", "i3d_inception", "s3d_inception",
            "i3d_r50_nl"} <= set(CNN_MODELS)


@pytest.mark.parametrize("name", CNN_MODELS)
def test_every_model_trains_on_a_tiny_clip_in_its_layout(name):
    torch.manual_seed(0)
    model = build(name, num_classes=5, num_frames=4, img_size=32, **TINY)
    assert model.layout == get_spec(name).layout == ("BCTHW" if name.split("_")[0] in
                                                     ("i3d", "r3d", "s3d", "r2plus1d") else "BTCHW")
    logits = model(clip(model.layout, t=2))
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    logits.logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", ["tsm_r18", "tam_r18", "i3d_r18", "s3d_r18", "r2plus1d_r18", "tam_inception",
                                  "s3d_inception"])
def test_temporal_pooling_variants_train_too(name):
    model = build(name, num_classes=3, num_frames=8, temporal_pool=True, **TINY)
    model(clip(model.layout, t=8)).sum().backward()


def test_a_clip_in_the_wrong_layout_is_refused_with_the_fix():
    model = build("tsm_r18", num_classes=3, **TINY)
    with pytest.raises(ValueError, match=r"BTCHW.*rearrange"):
        model(clip("BCTHW"))


def _frames_at(model, names, x, entering=False):
    """Clip length at the input (or output) of the named submodules during one forward pass."""
    seen, time_dim = {}, 1 if model.layout == "BTCHW" else 2

    def record(name):
        if entering:
            return lambda m, args: seen.__setitem__(name, args[0].shape[time_dim])
        return lambda m, args, out: seen.__setitem__(name, out.shape[time_dim])

    register = "register_forward_pre_hook" if entering else "register_forward_hook"
    hooks = [getattr(getattr(model, n), register)(record(n)) for n in names]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return [seen[n] for n in names]


@pytest.mark.parametrize("name", ["tsn_r18", "tam_r18", "i3d_r18", "s3d_r18"])
def test_temporal_pooling_halves_time_in_stages_2_3_and_4(name):
    # 2D nets max-pool time after stages 1-3, 3D nets stride time in the first block of stages 2-4:
    # either way each of stages 2-4 works on half the frames of the one before.
    stages = ["layer1", "layer2", "layer3", "layer4"]
    pooled = build(name, num_classes=3, temporal_pool=True, **TINY).eval()
    assert _frames_at(pooled, stages, clip(pooled.layout, t=8)) == [8, 4, 2, 1]
    full = build(name, num_classes=3, **TINY).eval()
    assert _frames_at(full, stages, clip(full.layout, t=8)) == [8, 8, 8, 8]


@pytest.mark.parametrize("name", ["tsn_inception", "i3d_inception"])
def test_inception_pools_time_where_it_pools_space(name):
    model = build(name, num_classes=3, temporal_pool=True, **TINY).eval()
    got = _frames_at(model, ["conv3", "inception3a", "inception4a", "inception5a"], clip(model.layout, t=8),
                     entering=True)
    assert got == [8, 4, 2, 1]


def test_tsn_logits_are_the_mean_of_independent_frame_logits():
    torch.manual_seed(0)
    model = build("tsn_r18", num_classes=4, **TINY).eval()
    x = clip("BTCHW", t=5)
    per_frame = torch.stack([model(x[:, i:i + 1]) for i in range(5)], 0).mean(0)
    assert torch.allclose(model(x), per_frame, atol=1e-5)


@pytest.mark.parametrize("name,mixes_time", [("tsn_r18", False), ("tsm_r18", True), ("tam_r18", True),
                                             ("i3d_r18", True), ("s3d_r18", True), ("tsm_inception", True)])
def test_only_temporal_models_let_one_frame_see_its_neighbour(name, mixes_time):
    torch.manual_seed(0)
    model = build(name, num_classes=4, **TINY).eval()
    x = clip(model.layout, b=1, t=4)
    x2 = x.clone()
    if model.layout == "BTCHW":
        x2[:, 0] += 1.0
        frame1 = lambda f: f[:, 1]  # noqa: E731
    else:
        x2[:, :, 0] += 1.0
        frame1 = lambda f: f[:, :, 1]  # noqa: E731
    with torch.no_grad():
        change = (frame1(model.forward_features(x2)) - frame1(model.forward_features(x))).abs().max()
    assert (change > 1e-6) == mixes_time


def blocks_with(model, module_type):
    """Per stage, the indices of the residual blocks whose temporal module is a `module_type`."""
    return [[i for i, block in enumerate(getattr(model, f"layer{s}")) if isinstance(block.temporal, module_type)]
            for s in range(1, 5)]


@pytest.mark.parametrize("placement,expected", [("all", 16), ("bottom", 3 + 4), ("top", 6 + 3), ("every_other", 9)])
def test_tam_placement_selects_residual_blocks(placement, expected):
    with torch.device("meta"):
        model = build("tam_r50", num_classes=3, tam_placement=placement)
    tams = [n for n, m in model.named_modules() if isinstance(m, TemporalAggregation)]
    assert len(tams) == expected
    if placement == "bottom":
        assert all(n.startswith(("layer1.", "layer2.")) for n in tams)
    if placement == "every_other":  # counted afresh in each stage, from its first block
        assert blocks_with(model, TemporalAggregation) == [[0, 2], [0, 2], [0, 2, 4], [0, 2]]


# mit-han-lab/temporal-shift-module, ops/temporal_shift.py, make_temporal_shift(place="blockres"): n_round = 2
# when layer3 has 23 blocks or more, else 1, then block i of every stage is shifted when i % n_round == 0.
@pytest.mark.parametrize("name,shifted", [
    ("tsm_r50", [[0, 1, 2], [0, 1, 2, 3], [0, 1, 2, 3, 4, 5], [0, 1, 2]]),
    ("tsm_r101", [[0, 2], [0, 2], list(range(0, 23, 2)), [0, 2]]),
])
def test_tsm_shifts_the_blocks_the_reference_code_shifts_stage_by_stage(name, shifted):
    with torch.device("meta"):
        model = build(name, num_classes=3)
    assert blocks_with(model, TemporalShift) == shifted
    shifts = [n for n, m in model.named_modules() if isinstance(m, TemporalShift)]
    assert all(n.endswith(".temporal") for n in shifts)  # inside the residual branch, before conv1


def test_tam_sits_in_every_block_of_r101_as_in_the_reference_code():
    # IBM/action-recognition-pytorch, models/twod_models/resnet.py: every block gets the temporal module.
    with torch.device("meta"):
        model = build("tam_r101", num_classes=3)
    assert blocks_with(model, TemporalAggregation) == [list(range(n)) for n in (3, 4, 23, 3)]


# IBM/action-recognition-pytorch, models/threed_models/i3d.py and s3d.py, forward(): the pools between stages as
# (kernel, stride, padding) over (T, H, W), floor mode; `t` is 2 with temporal pooling, 1 without.
def authors_pools(style, t):
    last = ((2, 2, 2), (t, 2, 2), (0, 0, 0)) if style == "s3d" else ((3, 3, 3), (t, 2, 2), (1, 1, 1))
    middle = ((3, 3, 3), (t, 2, 2), (1, 1, 1))
    return {"maxpool1": ((1, 3, 3), (1, 2, 2), (0, 1, 1)), "maxpool2": middle, "maxpool3": middle, "maxpool4": last}


def pooled_size(size, kernel, stride, padding):
    return tuple((n + 2 * p - k) // s + 1 for n, k, s, p in zip(size, kernel, stride, padding))


@pytest.mark.parametrize("style", ["i3d", "s3d"])
@pytest.mark.parametrize("temporal_pool", [False, True])
@pytest.mark.parametrize("frames", [8, 16])
def test_3d_inception_feature_maps_have_the_authors_sizes_after_every_pool(style, temporal_pool, frames):
    pools = authors_pools(style, 2 if temporal_pool else 1)
    expected, size = {}, (frames, 112, 112)  # the stem conv keeps time and halves 224 px
    for name, geometry in pools.items():
        size = expected[name] = pooled_size(size, *geometry)
    with torch.device("meta"):
        model = build(f"{style}_inception", num_classes=3, temporal_pool=temporal_pool).eval()
        seen = {}
        names = [*pools, "inception5b", *(f"{n}.branch4.0" for n in INCEPTIONS)]
        for n in names:
            model.get_submodule(n).register_forward_hook(
                lambda m, args, out, n=n: seen.__setitem__(n, (tuple(args[0].shape[2:]), tuple(out.shape[2:]))))
        model(torch.zeros(1, 3, frames, 224, 224))
    assert {n: seen[n][1] for n in pools} == expected
    assert seen["inception5b"][1] == expected["maxpool4"]
    assert all(seen[f"{n}.branch4.0"][0] == seen[f"{n}.branch4.0"][1] for n in INCEPTIONS)  # branch pools keep size


@pytest.mark.parametrize("style", ["i3d", "s3d"])
def test_3d_inception_pools_compute_the_authors_padded_floor_mode_max(style):
    # 9 x 9 px and 5 frames: sizes where padded floor-mode and unpadded ceil-mode pools sample different windows
    x = torch.randn(1, 2, 5, 9, 9, generator=torch.Generator().manual_seed(0))
    for temporal_pool in (False, True):
        ours = build(f"{style}_inception", num_classes=3, temporal_pool=temporal_pool, **TINY)
        googlenet = build(f"{style}_inception", num_classes=3, temporal_pool=temporal_pool, pools="googlenet", **TINY)
        for name, (kernel, stride, padding) in authors_pools(style, 2 if temporal_pool else 1).items():
            theirs = torch.nn.functional.max_pool3d(x, kernel, stride, padding)
            assert torch.equal(getattr(ours, name)(x), theirs), name
            other = getattr(googlenet, name)(x)
            assert other.shape != theirs.shape or not torch.equal(other, theirs), name


@pytest.mark.parametrize("frames", [8, 16])
def test_s3d_inception_without_temporal_pooling_shortens_time_by_one_as_the_authors_net_does(frames):
    got = {}
    with torch.device("meta"):
        for pools in ("ibm", "googlenet"):
            model = build("s3d_inception", num_classes=3, pools=pools).eval()
            got[pools] = _frames_at(model, ["head"], clip("BCTHW", b=1, t=frames, size=224), entering=True)[0]
    assert got == {"ibm": frames - 1, "googlenet": frames}


def test_non_local_blocks_follow_every_other_block_of_stages_2_and_3():
    with torch.device("meta"):
        model = build("i3d_r50_nl", num_classes=3)
    nls = [n for n, m in model.named_modules() if isinstance(m, NonLocal)]
    assert nls == ["layer2.0.nl", "layer2.2.nl", "layer3.0.nl", "layer3.2.nl", "layer3.4.nl"]


def test_3d_variants_replace_each_3x3_conv_as_the_paper_describes():
    with torch.device("meta"):
        i3d, s3d, r21d = (build(n, num_classes=3) for n in ("i3d_r50", "s3d_r50", "r2plus1d_r50"))
    assert tuple(i3d.conv1.weight.shape[2:]) == (3, 7, 7)
    assert tuple(i3d.layer3[0].conv2.weight.shape) == (256, 256, 3, 3, 3)
    assert tuple(i3d.layer3[0].conv1.weight.shape) == (256, 512, 1, 1, 1)
    assert tuple(s3d.layer3[0].conv2.weight.shape) == (256, 256, 1, 3, 3)
    assert tuple(s3d.layer3[0].conv2_t.weight.shape) == (256, 256, 3, 1, 1)
    assert tuple(r21d.layer3[0].conv2.weight.shape) == (576, 256, 1, 3, 3)  # floor(27*256/12)
    assert r21d.layer3[0].conv2_t.weight.shape[1] == 576


@pytest.mark.parametrize("name", [n for n in CNN_MODELS if get_spec(n).paper])
def test_parameters_and_flops_are_within_5_percent_of_the_paper(name):
    paper = get_spec(name).paper
    params, gflops = count(name, paper["frames"], paper["img_size"])
    assert abs(gflops - paper["gflops"]) / paper["gflops"] < 0.05, (name, gflops, paper)
    assert abs(params - paper["params_m"]) / paper["params_m"] < 0.05, (name, params, paper)


# IBM/action-recognition-pytorch, benchmark_full.md (Kinetics-400, 16 frames x 224): the reference code's own
# counts, including its temporal-pooling ("-tp") 3D nets, so they pin where time is pooled.
REFERENCE_COUNTS = [
    ("tsn_r50", {}, 65.394, 24.328), ("tam_r50", {}, 65.664, 24.367),
    ("i3d_r50", {"temporal_pool": True}, 58.920, 46.981), ("s3d_r50", {"temporal_pool": True}, 39.344, 28.126),
    ("tsn_inception", {}, 23.958, 6.010), ("tam_inception", {}, 24.094, 6.027),
    ("i3d_inception", {"temporal_pool": True}, 42.823, 12.697),
    ("s3d_inception", {"temporal_pool": True}, 24.529, 8.313),
]


@pytest.mark.parametrize("name,options,gflops,params_m", REFERENCE_COUNTS)
def test_counts_match_the_reference_implementation(name, options, gflops, params_m):
    ours_params, ours_gflops = count(name, 16, 224, **options)
    assert abs(ours_gflops - gflops) / gflops < 0.01, (ours_gflops, gflops)
    assert abs(ours_params - params_m) / params_m < 0.01, (ours_params, params_m)


def test_r2plus1d_has_the_parameters_of_i3d_and_s3d_fewer():
    i3d, _ = count("i3d_r50", 8, 112)
    r21d, _ = count("r2plus1d_r50", 8, 112)
    s3d, _ = count("s3d_r50", 8, 112)
    assert abs(r21d - i3d) / i3d < 0.01 and s3d < 0.7 * i3d


def test_bad_options_name_the_allowed_values():
    with pytest.raises(ValueError, match="every_other"):
        VideoResNet(depth=18, temporal="tam", tam_placement="middle")
    with pytest.raises(ValueError, match="r2plus1d"):
        VideoResNet(depth=18, temporal="c3d")
    with pytest.raises(ValueError, match="101"):
        VideoResNet(depth=152)
    with pytest.raises(ValueError, match="s3d"):
        VideoInception(temporal="r2plus1d")
    with pytest.raises(ValueError, match="googlenet"):
        VideoInception(temporal="i3d", pools="tf")
