"""I3D inflation: 2D ImageNet weights (torchvision, timm, or our own TSN) start every net of the framework."""
import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file

from models.inflate import inflate_conv_weight, load_pretrained
from models.registry import build

STAGES = ["layer1", "layer2", "layer3", "layer4"]


def randomise_batchnorm(model):
    """Give every BN non-trivial statistics and affine terms, so eval-mode nets exercise them."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    return model.eval()


def static_clip(frames, size, seed=0):
    """(1, T, 3, S, S): one random frame repeated T times."""
    frame = torch.randn(1, 1, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return frame.expand(1, frames, 3, size, size).contiguous()


def outputs_by_frame(model, names, x):
    """Outputs of the named submodules as (B, T, C, H, W), whatever the model's layout."""
    seen = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, a, out, n=n: seen.__setitem__(n, out if model.layout == "BTCHW" else out.transpose(1, 2)))
        for n in names]
    with torch.no_grad():
        model(x if model.layout == "BTCHW" else x.transpose(1, 2))
    for h in hooks:
        h.remove()
    return seen


def test_inflated_kernel_is_the_2d_kernel_spread_over_time():
    w = torch.randn(8, 4, 3, 3)
    inflated = inflate_conv_weight(w, 5)
    assert inflated.shape == (8, 4, 5, 3, 3)
    assert torch.allclose(inflated.sum(2), w) and torch.equal(inflated[:, :, 0], inflated[:, :, 4])


def test_inflated_i3d_reproduces_the_2d_net_on_a_static_clip_away_from_its_ends():
    torch.manual_seed(0)
    tsn = randomise_batchnorm(build("tsn_r18", 4, width_mult=0.25))
    i3d = build("i3d_r18", 4, width_mult=0.25)
    report = load_pretrained(i3d, tsn.state_dict())
    assert not report.missing and not report.mismatched and not report.unexpected
    i3d.eval()
    frames = 36
    x = static_clip(frames, 32)
    two_d, three_d = outputs_by_frame(tsn, STAGES, x), outputs_by_frame(i3d, STAGES, x)
    for k, stage in enumerate(STAGES, 1):
        reach = 1 + 4 * k  # frames the zero temporal padding reaches: stem 3x7x7, then two 3x3x3 convs a block
        inner = slice(reach, frames - reach)
        assert torch.allclose(three_d[stage][:, inner], two_d[stage][:, inner], rtol=1e-4, atol=1e-5), stage
        assert not torch.allclose(three_d[stage][:, 0], two_d[stage][:, 0], rtol=1e-2, atol=1e-3), stage


def test_2d_variants_take_the_weights_unchanged_and_keep_their_temporal_modules():
    tsn = randomise_batchnorm(build("tsn_r18", 4, width_mult=0.25))
    tam = build("tam_r18", 4, width_mult=0.25)
    report = load_pretrained(tam, tsn.state_dict())
    assert report.missing and all(k.endswith("temporal.blend.weight") for k in report.missing)
    ours = tam.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in tsn.state_dict().items())


def test_factorised_nets_take_their_spatial_halves_from_the_2d_convs():
    tsn = randomise_batchnorm(build("tsn_r18", 4, width_mult=0.25))
    s3d = build("s3d_r18", 4, width_mult=0.25)
    report = load_pretrained(s3d, tsn.state_dict())
    assert report.missing and all(("_t." in k) for k in report.missing)  # conv1_t/bn1_t/conv2_t/bn2_t are new
    assert torch.equal(s3d.layer2[1].conv2.weight[:, :, 0], tsn.layer2[1].conv2.weight)


def test_a_torchvision_resnet_file_inflates_into_i3d_and_matches_it_on_a_static_clip(tmp_path):
    torch.manual_seed(0)
    resnet = randomise_batchnorm(torchvision.models.resnet18(weights=None))
    path = tmp_path / "resnet18.pth"
    torch.save(resnet.state_dict(), path)
    i3d = build("i3d_r18", 7, pretrained=str(path)).eval()  # the registry's `pretrained=` path
    report = load_pretrained(i3d, path)  # the same load again, to read its report
    assert sorted(report.unexpected) == ["fc.bias", "fc.weight"]          # ImageNet classifier: not ours
    assert sorted(report.missing) == ["head.fc.bias", "head.fc.weight"]   # the video head starts fresh
    assert torch.allclose(i3d.conv1.weight.sum(2), resnet.conv1.weight, atol=1e-6)

    frames, reach = 20, 1 + 4 * 2  # compare after stage 2
    x = static_clip(frames, 32)
    ours = outputs_by_frame(i3d, ["layer2"], x)["layer2"][0, reach:frames - reach]
    with torch.no_grad():
        f = x[0, :1]
        theirs = resnet.layer2(resnet.layer1(resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(f))))))
    assert torch.allclose(ours, theirs.expand_as(ours), rtol=1e-4, atol=1e-5)


def test_a_timm_safetensors_checkpoint_loads_into_a_tsm_net(tmp_path):
    source = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "model.safetensors"
    save_file(source.state_dict(), str(path))
    tsm = build("tsm_r18", 5)
    report = load_pretrained(tsm, path)
    assert len(report.loaded) == len(source.state_dict()) - 2  # everything but fc.weight / fc.bias
    assert torch.equal(tsm.layer4[1].conv2.weight, source.layer4[1].conv2.weight)


def test_torchvision_googlenet_inflates_into_i3d_inception_with_googlenet_pools_exactly_on_a_static_clip():
    torch.manual_seed(0)
    googlenet = randomise_batchnorm(torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True,
                                                                 transform_input=False))
    i3d = build("i3d_inception", 3, pools="googlenet")  # the authors' padded pools sample another spatial grid
    report = load_pretrained(i3d, googlenet.state_dict())
    assert sorted(report.missing) == ["head.fc.bias", "head.fc.weight"] and not report.mismatched
    i3d.eval()
    # Zero temporal padding reaches 3 frames through the 7x7x7 stem, then one per 3x3x3 conv (conv3, 3a, 3b).
    frames, reach = 14, 6
    x = static_clip(frames, 32)
    ours = outputs_by_frame(i3d, ["inception3b"], x)["inception3b"][0, reach:frames - reach]
    g = googlenet
    with torch.no_grad():
        theirs = g.inception3b(g.inception3a(g.maxpool2(g.conv3(g.conv2(g.maxpool1(g.conv1(x[0, :1])))))))
    assert torch.allclose(ours, theirs.expand_as(ours), rtol=1e-4, atol=1e-5)


def test_a_checkpoint_of_another_architecture_is_refused():
    googlenet = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=False)
    with pytest.raises(ValueError, match="none of the .* fit VideoResNet"):
        load_pretrained(build("tsn_r18", 3), googlenet.state_dict())
