"""`python -m models.convert`: the authors' checkpoints, laid out as their code saves them, become our models.

Each source below is written the way the authors' training script saves it (top-level entries, `module.`
prefixes, their parameter names and shapes), with random values, from the authors' module structure: torchvision
or timm nets where their code wraps those, key lists written out from their constructors otherwise. After the
conversion every source tensor is looked up where the mapping puts it and compared by value, every model tensor
must have come from the file, and the loaded model runs.
"""
import argparse
import datetime
import re

import numpy as np
import pytest
import timm
import torch
import torchvision

import models
from models.convert import convert, main

CLASSES = 5


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def rand(*shape):
    return torch.randn(*shape)


def bn(prefix, channels):
    return {f"{prefix}.weight": rand(channels), f"{prefix}.bias": rand(channels),
            f"{prefix}.running_mean": rand(channels), f"{prefix}.running_var": torch.rand(channels) + 0.5,
            f"{prefix}.num_batches_tracked": torch.tensor(7)}


def library_state(make):
    """The state dict of a torchvision / timm net, by its names and shapes, with random values (BN variances
    positive); built on the meta device, so no initialisation is paid for."""
    with torch.device("meta"):
        state = make().state_dict()
    return {k: torch.rand(v.shape) + 0.5 if k.endswith("running_var") else
            torch.randn(v.shape) if v.is_floating_point() else torch.tensor(7) for k, v in state.items()}


def linear(prefix, cout, cin):
    return {f"{prefix}.weight": rand(cout, cin), f"{prefix}.bias": rand(cout)}


def save(path, state, **entries):
    torch.save({**entries, **state}, path)
    return str(path)


def converted(tmp_path, src, model, **kwargs):
    out = tmp_path / "converted.pt"
    record = convert(src, str(out), model, **kwargs)
    return models.load(str(out)), record


def assert_landed(net, record, source, place):
    """Every source tensor sits where `place(key)` says, by value (`place` gives our key, or (key, view) where
    view(our tensor) must equal the source tensor, or None for a tensor dropped with a reason); every model
    tensor came from the file and none kept its initialisation."""
    ours = net.state_dict()
    covered = set()
    for key, value in source.items():
        where = place(key)
        if where is None:
            assert key in record["dropped"], f"{key} neither placed nor dropped"
            continue
        our_key, view = where if isinstance(where, tuple) else (where, lambda t: t)
        assert torch.equal(view(ours[our_key]), value.to(ours[our_key].dtype)), f"{key} -> {our_key}"
        covered.add(our_key)
    assert covered == set(ours)
    assert record["kept"] == {}


# --- Swin in Microsoft's layout (SIFAR, SIFA-Transformer) ------------------------------------------------------

def relative_index(w):
    coords = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (w - 1)
    return rel[..., 0] * (2 * w - 1) + rel[..., 1]


def shift_mask(res, w, s):
    """-100 between two tokens of a shifted window that come from different regions of the rolled map, else 0."""
    def region(i):
        return 0 if i < res - w else 1 if i < res - s else 2
    ids = torch.tensor([[3 * region(r) + region(c) for c in range(res)] for r in range(res)])
    windows = ids.view(res // w, w, res // w, w).permute(0, 2, 1, 3).reshape(-1, w * w)
    return (windows[:, None, :] != windows[:, :, None]).float() * -100.0


def ms_swin(embed, depths, heads, window, patches, stem=(3, 4, 4), patch_norm=True, head="head", block_extra=None):
    """Microsoft's Swin as the authors' code saves it: merging at the end of a stage, derived buffers included,
    a block's shift 0 where the map fits in its window."""
    sd = {"patch_embed.proj.weight": rand(embed, *stem), "patch_embed.proj.bias": rand(embed)}
    if patch_norm:
        sd.update({"patch_embed.norm.weight": rand(embed), "patch_embed.norm.bias": rand(embed)})
    res = patches
    for i, (depth, nh) in enumerate(zip(depths, heads)):
        dim, w = embed * 2 ** i, min(window, res)
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}"
            shift = w // 2 if j % 2 and res > window else 0
            sd.update({f"{p}.norm1.weight": rand(dim), f"{p}.norm1.bias": rand(dim),
                       f"{p}.attn.relative_position_bias_table": rand((2 * w - 1) ** 2, nh),
                       f"{p}.attn.relative_position_index": relative_index(w),
                       **linear(f"{p}.attn.qkv", 3 * dim, dim), **linear(f"{p}.attn.proj", dim, dim),
                       f"{p}.norm2.weight": rand(dim), f"{p}.norm2.bias": rand(dim),
                       **linear(f"{p}.mlp.fc1", 4 * dim, dim), **linear(f"{p}.mlp.fc2", dim, 4 * dim)})
            if shift:
                sd[f"{p}.attn_mask"] = shift_mask(res, w, shift)
            if block_extra:
                sd.update(block_extra(p, dim))
        if i < len(depths) - 1:
            sd.update({f"layers.{i}.downsample.reduction.weight": rand(2 * dim, 4 * dim),
                       f"layers.{i}.downsample.norm.weight": rand(4 * dim),
                       f"layers.{i}.downsample.norm.bias": rand(4 * dim)})
        res //= 2
    last = embed * 2 ** (len(depths) - 1)
    sd.update({"norm.weight": rand(last), "norm.bias": rand(last), **linear(head, CLASSES, last)})
    return sd


def ms_to_timm(key):
    """Microsoft's Swin names -> timm's: merging moves to the start of the next stage."""
    return re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", key)


def sifar_args(**values):
    return argparse.Namespace(model="sifar_base_patch4_window7_224", duration=4, super_img_rows=2, **values)


# --- sifar ------------------------------------------------------------------------------------------------------

SIFAR_TINY = dict(embed_dim=16, depths=(2, 2), num_heads=(1, 2))      # two stages: windows 7, then global


def test_sifar_swin_checkpoint_lands_where_the_mapping_says(tmp_path):
    # 4 frames of 28 px: a 2x2 super image of 56 px, 14x14 patches; windows 7, shifted by 3, then one 7x7 window
    state = ms_swin(16, (2, 2), (1, 2), 7, 14)
    state["frame_pos_embed"] = rand(1, 4, 16)                   # --hpe_to_token: one embedding per tile
    src = save(tmp_path / "sifar.pth", {"model": state}, optimizer={}, lr_scheduler={}, epoch=29,
               args=sifar_args(hpe_to_token=True), scaler={}, max_accuracy=80.2)
    net, record = converted(tmp_path, src, "sifar_base_7_8x224", img_size=28, **SIFAR_TINY)

    def place(key):
        if key.endswith(("relative_position_index", "attn_mask")):
            return None
        if key == "frame_pos_embed":
            return key, lambda t: t.unsqueeze(0)
        return ms_to_timm(key).replace("head.", "head.fc.")
    assert_landed(net, record, state, place)
    assert record["format"] == "sifar" and net.contract.grid == (2, 2) and net.contract.num_frames == 4
    assert net(torch.randn(1, 4, 3, 28, 28)).shape == (1, CLASSES)


RESNET_TINY = dict(layers=(1, 1, 1, 1), channels=(8, 8, 16, 16))


def test_sifar_resnet_checkpoint_lands_where_the_mapping_says(tmp_path):
    # action_conv_resnet50's backbone is timm's resnet50; a narrow one with a block per stage keeps the test small
    backbone = library_state(lambda: timm.create_model("resnet50", **RESNET_TINY))
    state = {**{f"backbone.{k}": v for k, v in backbone.items()}, **linear("head", CLASSES, 64)}
    args = argparse.Namespace(model="action_conv_resnet50", duration=4, super_img_rows=2)
    src = save(tmp_path / "sifar_r50.pth", {"model": state}, optimizer={}, epoch=3, args=args)
    net, record = converted(tmp_path, src, "sifar_resnet50", img_size=32, **RESNET_TINY)

    def place(key):
        if key.startswith("backbone.fc."):
            return None                                             # timm's ImageNet classifier, never called
        return key.replace("backbone.", "net.") if key.startswith("backbone.") else key.replace("head.", "net.fc.")
    assert_landed(net, record, state, place)
    assert net(torch.randn(1, 4, 3, 32, 32)).shape == (1, CLASSES)


def test_bn_counters_missing_from_an_old_file_start_at_zero_and_the_record_says_so(tmp_path):
    backbone = library_state(lambda: timm.create_model("resnet50", **RESNET_TINY))
    state = {**{f"backbone.{k}": v for k, v in backbone.items() if not k.endswith("num_batches_tracked")},
             **linear("head", CLASSES, 64)}                   # as PyTorch < 0.4.1 saved BatchNorm
    net, record = converted(tmp_path, save(tmp_path / "old.pth", {"model": state}), "sifar_resnet50", num_frames=4,
                            img_size=32, **RESNET_TINY)
    counters = [k for k in net.state_dict() if k.endswith("num_batches_tracked")]
    assert counters and set(record["kept"]) == set(counters)
    assert all(net.state_dict()[k] == 0 for k in counters)
    assert torch.equal(net.net.conv1.weight, state["backbone.conv1.weight"])


def test_sifar_refuses_other_windows_and_a_stray_tensor(tmp_path):
    state = ms_swin(16, (2, 2), (1, 2), 7, 14)
    src = save(tmp_path / "sifar.pth", {"model": state}, args=sifar_args())
    with pytest.raises(ValueError, match=r"windows or shifts differ.*layers\.0\.blocks\.0\.attn\.relative_position"):
        convert(src, str(tmp_path / "out.pt"), "sifar_base_14_8x224", img_size=28, **SIFAR_TINY)
    state["layers.0.blocks.0.attn.extra"] = rand(3)
    src = save(tmp_path / "sifar.pth", {"model": state}, args=sifar_args())
    with pytest.raises(ValueError, match=r"1 tensors of the file have no place.*layers\.0\.blocks\.0\.attn\.extra"):
        convert(src, str(tmp_path / "out.pt"), "sifar_base_7_8x224", img_size=28, **SIFAR_TINY)


# --- ibm-ar ------------------------------------------------------------------------------------------------------

# Inception-v1's TAMs: after the stem convs and every inception module, with those modules' output channels.
INCEPTION_TAMS = {"1": 64, "2": 64, "3": 192, "3a": 256, "3b": 480, "4a": 512, "4b": 512, "4c": 512, "4d": 528,
                  "4e": 832, "5a": 832, "5b": 1024}


def tam(prefix, channels):
    """IBM's TAM: one depthwise 1x1 conv per frame offset."""
    return {f"{prefix}.{which}_se.fc1.weight": rand(channels, 1, 1, 1) for which in ("prev", "curr", "next")}


def ibm_resnet18(kind):
    """twod_models/resnet.py ("tam": a TAM on each block's input channels) or threed_models/s3d_resnet.py ("s3d":
    3x7x7 stem, each 3x3 a 1x3x3 then a 3x1x1 with its own BN), both with torchvision's names."""
    sd = {}
    for k, v in library_state(torchvision.models.resnet18).items():
        conv = re.fullmatch(r"(layer\d\.\d)\.conv([12])\.weight", k)
        if k.startswith("fc."):
            continue
        if kind == "s3d" and k == "conv1.weight":
            sd[k] = rand(64, 3, 3, 7, 7)
        elif kind == "s3d" and conv:
            o = v.shape[0]
            sd.update({k: v.unsqueeze(2), f"{conv[1]}.conv{conv[2]}_t.weight": rand(o, o, 3, 1, 1),
                       **bn(f"{conv[1]}.bn{conv[2]}_t", o)})
        elif kind == "s3d" and k.endswith("downsample.0.weight"):
            sd[k] = v.unsqueeze(2)
        else:
            sd[k] = v
        if kind == "tam" and conv and conv[2] == "1":
            sd.update(tam(f"{conv[1]}.tam", v.shape[1]))
    return {**sd, **linear("fc", CLASSES, 512)}


def ibm_inception(kind):
    """twod_models/inception_v1.py ("tam": TAMs tam1..tam5b) or threed_models/s3d.py ("s3d": 3x7x7 stem, each
    3x3 a 1x3x3 then a 3x1x1 with bias and its own BN), both with torchvision GoogLeNet's names."""
    sd = {}
    state = library_state(lambda: torchvision.models.googlenet(aux_logits=False, transform_input=False,
                                                               init_weights=False))
    for k, v in state.items():
        unit = k[:-len(".conv.weight")]
        if k.startswith("fc."):
            continue
        if kind == "s3d" and k == "conv1.conv.weight":
            sd[k] = rand(64, 3, 3, 7, 7)
        elif kind == "s3d" and k.endswith("conv.weight") and v.shape[-1] == 3:
            o = v.shape[0]
            sd.update({k: v.unsqueeze(2), f"{unit}.conv_t.weight": rand(o, o, 3, 1, 1),
                       f"{unit}.conv_t.bias": rand(o), **bn(f"{unit}.bn_t", o)})
        elif kind == "s3d" and k.endswith("conv.weight"):
            sd[k] = v.unsqueeze(2)
        else:
            sd[k] = v
    if kind == "tam":
        for stage, channels in INCEPTION_TAMS.items():
            sd.update(tam(f"tam{stage}", channels))
    return {**sd, **linear("fc", CLASSES, 1024)}


def ibm_place(key):
    if key.startswith("fc."):
        return key.replace("fc.", "head.fc.")
    if match := re.fullmatch(r"(?:(layer\d\.\d)\.tam|tam(\d[a-e]?))\.(prev|curr|next)_se\.fc1\.weight", key):
        block, stage, which = match.groups()
        unit = f"conv{stage}" if stage and stage.isdigit() else f"inception{stage}"
        ours = f"{block}.temporal.blend.weight" if block else f"temporal.{unit}.blend.weight"
        offset = ("prev", "curr", "next").index(which)    # output channel 3c + offset holds input channel c
        return ours, lambda t: t.view(-1, 3)[:, offset].reshape(-1, 1, 1, 1)
    return key


def ibm_checkpoint(tmp_path, state, network, frames=4):
    return save(tmp_path / "ibm.pth.tar", {"state_dict": {f"module.{k}": v for k, v in state.items()}}, epoch=50,
                arch=f"kinetics400-rgb-{network}-f{frames}-cosine-bs64-e50", best_top1=np.float64(76.2), optimizer={},
                scheduler={})


@pytest.mark.parametrize("model, network, make", [
    ("tam_r18", "TAM-b3-sum-resnet-18", lambda: ibm_resnet18("tam")),
    ("s3d_r18", "s3d-resnet-18", lambda: ibm_resnet18("s3d")),
    ("tam_inception", "TAM-b3-sum-inception-v1", lambda: ibm_inception("tam")),
    ("s3d_inception", "s3d", lambda: ibm_inception("s3d")),
])
def test_ibm_ar_checkpoint_lands_where_the_mapping_says(tmp_path, model, network, make):
    state = make()
    net, record = converted(tmp_path, ibm_checkpoint(tmp_path, state, network), model)
    assert_landed(net, record, state, ibm_place)
    assert net.contract.num_frames == 4 and net.build_record["options"] == {"temporal_pool": False}
    if model.endswith("inception"):
        assert net.contract.mean == net.contract.std == (0.5, 0.5, 0.5)     # IBM's Inception nets read [-1, 1]
    clip = torch.randn(1, 2, 3, 32, 32)
    assert net(clip.transpose(1, 2) if net.layout == "BCTHW" else clip).shape == (1, CLASSES)


def test_ibm_ar_refuses_a_partial_checkpoint_another_network_and_a_dense_tam(tmp_path):
    state = ibm_resnet18("tam")
    partial = {k: v for k, v in state.items() if k != "layer2.0.bn1.running_mean"}
    with pytest.raises(ValueError, match=r"tam_r18 has 1 tensors the file does not provide: layer2\.0\.bn1\.running"):
        convert(ibm_checkpoint(tmp_path, partial, "TAM-b3-sum-resnet-18"), str(tmp_path / "o.pt"), "tam_r18")
    with pytest.raises(ValueError, match=r"trained as i3d_r18 .* pass --model i3d_r18"):
        convert(ibm_checkpoint(tmp_path, state, "i3d-resnet-18"), str(tmp_path / "o.pt"), "tam_r18")
    dense = {**state, "layer1.0.tam.prev_se.fc1.weight": rand(64, 64, 1, 1)}
    with pytest.raises(ValueError, match=r"layer1\.0\.tam\.prev_se\.fc1\.weight .*dense TAM"):
        convert(ibm_checkpoint(tmp_path, dense, "TAM-b3-sum-resnet-18"), str(tmp_path / "o.pt"), "tam_r18")


# --- tsm ---------------------------------------------------------------------------------------------------------

TSM_NL_BLOCKS = ("layer2.0", "layer2.2", "layer3.0", "layer3.2", "layer3.4")     # ops/non_local.py
TSM_FILE = "TSM_kinetics_RGB_resnet50_shift8_blockres_avg_segment8_e100_dense_nl.pth"


def tsm_resnet50():
    """ops/models.py's TSN(base_model='resnet50', is_shift=True, shift_place='blockres', non_local=True)."""
    sd = {}
    for k, v in library_state(torchvision.models.resnet50).items():
        if k.startswith("fc."):
            continue                                  # replaced by dropout; the classifier is new_fc
        if block := re.fullmatch(r"(layer\d\.\d+)\.(.*)", k):
            name, rest = block.groups()
            rest = "conv1.net.weight" if rest == "conv1.weight" else rest      # TemporalShift(conv1) on every block
            k = f"{name}.block.{rest}" if name in TSM_NL_BLOCKS else f"{name}.{rest}"
        sd[f"base_model.{k}"] = v
    for name in TSM_NL_BLOCKS:
        c = sd[f"base_model.{name}.block.bn3.weight"].shape[0]
        p = f"base_model.{name}.nl"
        sd.update({f"{p}.g.0.weight": rand(c // 2, c, 1, 1, 1), f"{p}.g.0.bias": rand(c // 2),
                   f"{p}.theta.weight": rand(c // 2, c, 1, 1, 1), f"{p}.theta.bias": rand(c // 2),
                   f"{p}.phi.0.weight": rand(c // 2, c, 1, 1, 1), f"{p}.phi.0.bias": rand(c // 2),
                   f"{p}.W.0.weight": rand(c, c // 2, 1, 1, 1), f"{p}.W.0.bias": rand(c), **bn(f"{p}.W.1", c)})
    return {**sd, **linear("new_fc", CLASSES, 2048)}


def tsm_checkpoint(tmp_path, state):
    return save(tmp_path / TSM_FILE, {"state_dict": {f"module.{k}": v for k, v in state.items()}}, epoch=100,
                arch="resnet50", optimizer={}, best_prec1=75.6)


def test_tsm_checkpoint_lands_where_the_mapping_says(tmp_path):
    state = tsm_resnet50()
    net, record = converted(tmp_path, tsm_checkpoint(tmp_path, state), "tsm_r50")

    def place(key):
        key = key.replace("new_fc.", "head.fc.").replace("base_model.", "").replace(".block.", ".")
        for theirs, ours in ((".conv1.net.", ".conv1."), (".nl.g.0.", ".nl.g."), (".nl.phi.0.", ".nl.phi."),
                             (".nl.W.0.", ".nl.out."), (".nl.W.1.", ".nl.bn.")):
            key = key.replace(theirs, ours)
        return key
    assert_landed(net, record, state, place)
    assert net.build_record["options"] == {"non_local": True, "tsm_fold_div": 8} and net.contract.num_frames == 8
    assert net(torch.randn(1, 2, 3, 32, 32)).shape == (1, CLASSES)


def test_tsm_refuses_a_checkpoint_that_shifts_other_blocks_and_a_tsn_model(tmp_path):
    state = tsm_resnet50()
    state["base_model.layer1.1.conv1.weight"] = state.pop("base_model.layer1.1.conv1.net.weight")
    with pytest.raises(ValueError, match=r"shifts other blocks than tsm_r50: only in the checkpoint: none; only in "
                                         r"the model: layer1\.1"):
        convert(tsm_checkpoint(tmp_path, state), str(tmp_path / "o.pt"), "tsm_r50")
    with pytest.raises(ValueError, match=r"is a TSM ResNet, tsn_r50 is not"):
        convert(tsm_checkpoint(tmp_path, state), str(tmp_path / "o.pt"), "tsn_r50")


# --- sifa --------------------------------------------------------------------------------------------------------

SIFA_NET_TINY = dict(img_size=32, layers=(1, 2, 1, 1), channels=(8, 8, 16, 32))


def sifa_bottleneck(p, cin, width, downsample, kind, times, k=3):
    """c2d_sifa_resnet.py's Bottleneck / GBottleneck ("context") / DEFLocalTransBottleneck ("sifa"), 3D convs."""
    out = 4 * width
    sd = {f"{p}.conv1.weight": rand(width, cin, 1, 1, 1), **bn(f"{p}.bn1", width),
          f"{p}.conv2.weight": rand(width, width, 1, 3, 3), **bn(f"{p}.bn2", width),
          f"{p}.conv3.weight": rand(out, width, 1, 1, 1), **bn(f"{p}.bn3", out)}
    if downsample:
        sd.update({f"{p}.downsample.0.weight": rand(out, cin, 1, 1, 1), **bn(f"{p}.downsample.1", out)})
    if kind == "context":
        sd.update({**linear(f"{p}.fc1", out // 16, out), **linear(f"{p}.fc2", out, out // 16)})
    if kind == "sifa":
        sd.update({f"{p}.conv_offset.weight": rand(2 * k * k, width, 1, 3, 3),
                   f"{p}.def_cor.weight": torch.full((width, times, k, k), 1.0 / width)})
    return sd


def sifa_net(layers=(1, 2, 1, 1), planes=(8, 8, 16, 32), frames=8, stride=2):
    """C2D_SIFA_ResNet: a stride x 7 x 7 stem, plain res2, context/SIFA blocks alternating in res3-res5 and in the
    stride-1 res5 on time-pooled res4 (half the frames), two classifiers."""
    sd = {"conv1.weight": rand(64, 3, stride, 7, 7), **bn("bn1", 64)}
    stages = [(f"layer{s + 1}", n, w, s > 0, s > 0) for s, (n, w) in enumerate(zip(layers, planes))]
    stages.append(("layer4_dual", layers[3], planes[3], False, True))
    cins = [64, 4 * planes[0], 4 * planes[1], 4 * planes[2], 4 * planes[2]]
    for (name, n, width, strided, alternate), cin in zip(stages, cins):
        times = frames // stride // (2 if name == "layer4_dual" else 1)
        for i in range(n):
            kind = ("context" if i % 2 == 0 else "sifa") if alternate else "plain"
            first = i == 0 and (strided or cin != 4 * width)
            sd.update(sifa_bottleneck(f"{name}.{i}", cin if i == 0 else 4 * width, width, first, kind, times))
    return {**sd, **linear("fc", CLASSES, 4 * planes[3]), **linear("fc_dual", CLASSES, 4 * planes[3])}


def sifa_swin(frames=8, stride=2, k=3):
    """C2D_SIFA_SWIN_ViT at a tiny size: a bare tubelet conv, and in every block `tda_norm`, `conv` and
    `def_cor`; maps 8 then 4 with windows 4, so only layers.0.blocks.1 is shifted."""
    def extra(p, dim):
        return {f"{p}.tda_norm.weight": rand(dim), f"{p}.tda_norm.bias": rand(dim),
                f"{p}.conv.weight": rand(dim, dim, 1, 3),
                f"{p}.def_cor.weight": torch.full((dim, frames // stride, k, k), 1.0 / dim)}
    return ms_swin(16, (2, 2), (1, 2), 4, 8, stem=(3, stride, 4, 4), patch_norm=False, head="fc", block_extra=extra)


def sifa_checkpoint(tmp_path, state):
    return save(tmp_path / "current.pth", {"model": {f"module.{k}": v for k, v in state.items()}},
                opt=argparse.Namespace(net_name="c2d_sifa_resnet50", clip_length=8), optimizer={}, scheduler={},
                epoch=64)


def test_sifa_net_checkpoint_lands_where_the_mapping_says(tmp_path):
    state = sifa_net()
    net, record = converted(tmp_path, sifa_checkpoint(tmp_path, state), "sifa_r50_released", **SIFA_NET_TINY)

    def place(key):
        if key.endswith("def_cor.weight"):
            return None
        ours = re.sub(r"\.(fc[12])\.", r".se.\1.", key).replace(".conv_offset.", ".act2.sifa.offset_next.")
        if key.startswith("layer") and key.endswith("weight") and state[key].dim() == 5:
            return ours, lambda t: t.unsqueeze(2)          # 1x1x1 / 1x3x3 kernels are our 2D ones
        return ours
    assert_landed(net, record, state, place)
    assert net.contract.num_frames == 8 and net.build_record["options"]["temporal_stride"] == 2
    assert net(torch.randn(1, 8, 3, 32, 32)).shape == (1, CLASSES)


SIFA_SWIN_TINY = dict(img_size=32, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4)


def sifa_swin_place(key):
    if key.endswith(("relative_position_index", "attn_mask", "def_cor.weight")):
        return None
    shifted = key.startswith("layers.0.blocks.1.")
    if ".tda_norm." in key:         # the LayerNorm on SIFA's term: used where the windows are unshifted
        return None if shifted else key.replace(".tda_norm.", ".temporal.norm.")
    if ".conv." in key:             # the temporal conv: used where they are shifted
        return key.replace(".conv.", ".temporal.conv.") if shifted else None
    return ms_to_timm(key).replace("fc.", "head.fc.", 1) if key.startswith("fc.") else ms_to_timm(key)


def test_sifa_swin_checkpoint_lands_where_the_mapping_says(tmp_path):
    state = sifa_swin()
    net, record = converted(tmp_path, sifa_checkpoint(tmp_path, state), "sifa_swin_t", **SIFA_SWIN_TINY)
    assert_landed(net, record, state, sifa_swin_place)
    assert "layers.1.blocks.1.temporal.norm.weight" in net.state_dict()    # both blocks of the one-window stage
    assert "patch_embed.norm.weight" not in net.state_dict()
    assert net(torch.randn(1, 8, 3, 32, 32)).shape == (1, CLASSES)


def test_sifa_refuses_a_learned_correlation_weight_and_a_partial_checkpoint(tmp_path):
    state = sifa_swin()
    learned = {**state, "layers.1.blocks.0.def_cor.weight": rand(32, 4, 3, 3)}
    with pytest.raises(ValueError, match=r"layers\.1\.blocks\.0\.def_cor\.weight is not the constant 1/C"):
        convert(sifa_checkpoint(tmp_path, learned), str(tmp_path / "o.pt"), "sifa_swin_t", **SIFA_SWIN_TINY)
    partial = {k: v for k, v in state.items() if k != "layers.1.blocks.1.tda_norm.bias"}
    with pytest.raises(ValueError, match=r"1 tensors the file does not provide: layers\.1\.blocks\.1\.temporal\.norm"):
        convert(sifa_checkpoint(tmp_path, partial), str(tmp_path / "o.pt"), "sifa_swin_t", **SIFA_SWIN_TINY)


# --- tokshift and ivvit ------------------------------------------------------------------------------------------

DIM, DEPTH = 48, 2           # ivvit_tiny_patch16_224 narrowed and shortened, at 32 px (2x2 patches), to stay small
VIT_TINY = dict(embed_dim=DIM, depth=DEPTH, num_heads=3)


def tokshift_vit(tokens=5):
    """modeling_tokshift.py's VisionTransformer body (jeonsworld's ViT layout), without its classifier."""
    t = "transformer."
    sd = {f"{t}embeddings.patch_embeddings.weight": rand(DIM, 3, 16, 16),
          f"{t}embeddings.patch_embeddings.bias": rand(DIM),
          f"{t}embeddings.position_embeddings": rand(1, tokens, DIM), f"{t}embeddings.cls_token": rand(1, 1, DIM),
          f"{t}encoder.encoder_norm.weight": rand(DIM), f"{t}encoder.encoder_norm.bias": rand(DIM)}
    for i in range(DEPTH):
        p = f"{t}encoder.layer.{i}"
        for norm in ("attention_norm", "ffn_norm"):
            sd.update({f"{p}.{norm}.weight": rand(DIM), f"{p}.{norm}.bias": rand(DIM)})
        for proj in ("query", "key", "value", "out"):
            sd.update(linear(f"{p}.attn.{proj}", DIM, DIM))
        sd.update({**linear(f"{p}.ffn.fc1", 4 * DIM, DIM), **linear(f"{p}.ffn.fc2", DIM, 4 * DIM)})
    return sd


def torchvision_vit(tokens=5):
    """IV-ViT's models/vit.py (torchvision's ViT) body, without its heads."""
    sd = {"conv_proj.weight": rand(DIM, 3, 16, 16), "conv_proj.bias": rand(DIM), "class_token": rand(1, 1, DIM),
          "encoder.pos_embedding": rand(1, tokens, DIM), "encoder.ln.weight": rand(DIM), "encoder.ln.bias": rand(DIM)}
    for i in range(DEPTH):
        p = f"encoder.layers.encoder_layer_{i}"
        sd.update({f"{p}.ln_1.weight": rand(DIM), f"{p}.ln_1.bias": rand(DIM), f"{p}.ln_2.weight": rand(DIM),
                   f"{p}.ln_2.bias": rand(DIM), f"{p}.self_attention.in_proj_weight": rand(3 * DIM, DIM),
                   f"{p}.self_attention.in_proj_bias": rand(3 * DIM),
                   **linear(f"{p}.self_attention.out_proj", DIM, DIM), **linear(f"{p}.mlp.linear_1", 4 * DIM, DIM),
                   **linear(f"{p}.mlp.linear_2", DIM, 4 * DIM)})
    return sd


VIT_NAMES = [  # jeonsworld's | torchvision's -> timm's, applied in turn
    (r"transformer\.embeddings\.patch_embeddings|conv_proj", "patch_embed.proj"),
    (r"transformer\.embeddings\.position_embeddings|encoder\.pos_embedding", "pos_embed"),
    (r"transformer\.embeddings\.cls_token|class_token", "cls_token"),
    (r"transformer\.encoder\.encoder_norm|^encoder\.ln(?=\.)", "norm"),
    (r"transformer\.encoder\.layer\.(\d+)|encoder\.layers\.encoder_layer_(\d+)", r"blocks.\1\2"),
    (r"attention_norm|ln_1", "norm1"), (r"ffn_norm|ln_2", "norm2"),
    (r"attn\.out|self_attention\.out_proj", "attn.proj"), (r"self_attention\.in_proj_", "attn.qkv."),
    (r"ffn\.fc1|mlp\.linear_1", "mlp.fc1"), (r"ffn\.fc2|mlp\.linear_2", "mlp.fc2"),
]


def vit_place(key, head):
    """Our timm ViT key for a ViT key of either layout (prefix `base_model.` removed); qkv slices by offset."""
    key = key.removeprefix("base_model.")
    if match := re.fullmatch(r"transformer\.encoder\.layer\.(\d+)\.attn\.(query|key|value)\.(weight|bias)", key):
        block, proj, part = match.groups()
        offset = ("query", "key", "value").index(proj) * DIM
        return f"blocks.{block}.attn.qkv.{part}", lambda t: t[offset:offset + DIM]
    if match := re.fullmatch(r"heads?\.head\.([^.]+)\.(weight|bias)", key):
        return f"heads.{match[1]}.{match[2]}"
    if key.startswith("head."):
        return f"heads.{head}.{key[5:]}"
    for theirs, ours in VIT_NAMES:
        key = re.sub(theirs, ours, key)
    return key


def test_tokshift_checkpoint_converts_on_the_command_line_and_lands_where_the_mapping_says(tmp_path, capsys):
    state = {f"base_model.{k}": v for k, v in tokshift_vit().items()} | {
        f"base_model.{k}": v for k, v in linear("head", CLASSES, DIM).items()}
    src = save(tmp_path / "best_ckpt_e17.pth", {"state_dict": {f"module.{k}": v for k, v in state.items()}},
               epoch=18, best_acc1=77.3, optimizer={}, scheduler={})
    out, names = tmp_path / "tokshift.pt", [f"class {i}" for i in range(CLASSES)]
    (tmp_path / "classes.txt").write_text("\n".join(names) + "\n")
    main([src, str(out), "--model", "ivvit_tiny_patch16_224", "--num-frames", "8", "--classes",
          str(tmp_path / "classes.txt"), *(f"--set={k}={v}" for k, v in VIT_TINY.items())])
    printed = capsys.readouterr().out
    assert "format tokshift" in printed and f"wrote {out}" in printed
    net = models.load(str(out))
    saved = torch.load(out, weights_only=True)
    record = saved["source"]
    assert saved["classes"] == names
    assert_landed(net, record, state, lambda key: vit_place(key, "default"))
    assert net.contract.mean == net.contract.std == (0.5, 0.5, 0.5) and net.contract.crop_size == 32
    assert net.build_record["options"] == {"token_shift": True, "fold_div": 4, **VIT_TINY}
    assert net(torch.randn(1, 2, 3, 32, 32)).shape == (1, CLASSES)


@pytest.mark.parametrize("layout", ["ViT", "tokenshift"])
def test_ivvit_checkpoint_with_its_per_dataset_heads_lands_where_the_mapping_says(tmp_path, layout):
    body, heads = (torchvision_vit(), "heads") if layout == "ViT" else (tokshift_vit(), "head")
    state = {f"base_model.{k}": v for k, v in body.items()}
    for dataset, n in (("Kinetics200", 7), ("Tiny-ImageNet", 3)):       # MyHeadDict: one Linear per dataset
        state.update(linear(f"base_model.{heads}.head.{dataset}", n, DIM))
    net, record = converted(tmp_path, save(tmp_path / "iv_vit.pth", state), "ivvit_tiny_patch16_224", **VIT_TINY)
    assert_landed(net, record, state, lambda key: vit_place(key, None))
    options = net.build_record["options"]
    assert options["heads"] == {"Kinetics200": 7, "Tiny-ImageNet": 3}
    assert options["token_shift"] == (layout == "tokenshift") and net.contract.num_frames == 16
    assert net.contract.mean == (0.45,) * 3 and net.contract.std == (0.225,) * 3
    assert net(torch.randn(1, 2, 3, 32, 32), dataset="Kinetics200").shape == (1, 7)
    assert net(torch.randn(2, 3, 32, 32), dataset="Tiny-ImageNet").shape == (2, 3)


def test_vit_formats_refuse_a_missing_frame_count_and_a_head_replacement_among_several(tmp_path):
    tok = {f"module.base_model.{k}": v for k, v in {**tokshift_vit(), **linear("head", CLASSES, DIM)}.items()}
    src = save(tmp_path / "tok.pth", {"state_dict": tok})
    with pytest.raises(ValueError, match=r"give --num-frames \(the file does not record it"):
        convert(src, str(tmp_path / "o.pt"), "ivvit_tiny_patch16_224", **VIT_TINY)
    iv = {f"base_model.{k}": v for k, v in torchvision_vit().items()}
    iv.update({**linear("base_model.heads.head.UCF101", 4, DIM), **linear("base_model.heads.head.CIFAR100", 6, DIM)})
    with pytest.raises(ValueError, match=r"one classifier per dataset \(UCF101, CIFAR100\)"):
        convert(save(tmp_path / "iv.pth", iv), str(tmp_path / "o.pt"), "ivvit_tiny_patch16_224", num_classes=10,
                **VIT_TINY)


def test_num_classes_replaces_the_classifier_and_the_record_says_so(tmp_path):
    tok = {f"module.base_model.{k}": v for k, v in {**tokshift_vit(), **linear("head", CLASSES, DIM)}.items()}
    src = save(tmp_path / "tok.pth", {"state_dict": tok})
    net, record = converted(tmp_path, src, "ivvit_tiny_patch16_224", num_frames=8, num_classes=11, **VIT_TINY)
    assert net.heads.default.weight.shape == (11, DIM)
    assert "replaced by a new one of 11" in record["dropped"]["base_model.head.weight"]
    assert set(record["kept"]) == {"heads.default.weight", "heads.default.bias"}
    assert torch.equal(net.cls_token, tok["module.base_model.transformer.embeddings.cls_token"])


# --- the command line ----------------------------------------------------------------------------------------------

AMBIGUOUS = ["backbone.conv1.weight", "head.weight", "conv1.weight", "fc.weight", "layer1.0.conv1.weight"]


@pytest.mark.parametrize("keys, extra, model, message", [
    (None, {}, "tsn_r18", r"error: checkpoint '.*x\.pth' not found"),
    (["fc.weight"], {}, "no_such_model", r"error: unknown model 'no_such_model'"),
    (["encoder.w"], {}, "tsn_r18", r"error: .* no known checkpoint format has keys like encoder\.w"),
    (AMBIGUOUS, {}, "tsn_r18", r"error: .* the keys fit several formats \(sifar, ibm-ar\); pass --format"),
    (["fc.weight"], {"day": datetime.date(2021, 5, 1)}, "tsn_r18", r"error: .* holds pickled objects besides "
                                                                      r"tensors.*datetime.*pass --trust-pickle"),
], ids=["missing file", "unknown model", "unknown keys", "ambiguous keys", "pickled objects"])
def test_the_command_line_prints_one_line_errors_without_a_traceback(tmp_path, capsys, keys, extra, model, message):
    src = save(tmp_path / "x.pth", {"state_dict": {k: rand(2) for k in keys}}, **extra) if keys else \
        str(tmp_path / "x.pth")
    with pytest.raises(SystemExit) as exit_:
        main([src, str(tmp_path / "out.pt"), "--model", model])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert re.match(message, err)
