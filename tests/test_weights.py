"""Local pretrained weights: file formats, nesting, prefixes, the load report, Swin tables and ViT grids."""
from __future__ import annotations

import argparse
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from models.weights import (adapt_swin, load_pretrained, read_state_dict, resize_pos_embed,
                            resize_rel_pos_bias_tables, strip_prefixes)


def small_swin(window_size=3, num_classes=10) -> SwinTransformer:
    # 96 px: maps of 24/12/6/3 tokens, all tiled by 3-token windows.
    return SwinTransformer(img_size=96, window_size=window_size, embed_dim=16, depths=(2, 2, 2, 2),
                           num_heads=(1, 1, 2, 2), num_classes=num_classes)


def tables(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.endswith("relative_position_bias_table")}


def assert_same_weights(a: nn.Module, b: nn.Module, skip=lambda key: False):
    sb = b.state_dict()
    for key, value in a.state_dict().items():
        if not skip(key):
            torch.testing.assert_close(value, sb[key], msg=key)


def test_reads_a_pth_nested_under_model_and_strips_wrapper_prefixes(tmp_path):
    net = nn.Linear(3, 2)
    nested = {"epoch": 3, "model": {f"module.{k}": v for k, v in net.state_dict().items()}}
    torch.save(nested, tmp_path / "ckpt.pth")
    target = nn.Linear(3, 2)
    report = load_pretrained(target, tmp_path / "ckpt.pth", strict=True)
    assert sorted(report.loaded) == ["bias", "weight"]
    assert_same_weights(net, target)


def test_reads_a_state_dict_nested_twice(tmp_path):
    net = nn.Linear(3, 2)
    torch.save({"state_dict": {"model": net.state_dict()}}, tmp_path / "ckpt.pt")
    assert read_state_dict(tmp_path / "ckpt.pt").keys() == net.state_dict().keys()


def test_reads_safetensors(tmp_path):
    net = nn.Linear(3, 2)
    save_file(net.state_dict(), str(tmp_path / "w.safetensors"))
    target = nn.Linear(3, 2)
    load_pretrained(target, tmp_path / "w.safetensors", strict=True)
    assert_same_weights(net, target)


def test_custom_prefixes_are_stripped_repeatedly():
    stripped = strip_prefixes({"module.backbone.fc.weight": torch.zeros(1)}, ("module.", "backbone."))
    assert list(stripped) == ["fc.weight"]


def test_a_missing_file_names_the_path_and_says_nothing_is_downloaded(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pth.*never downloaded"):
        read_state_dict(tmp_path / "nowhere.pth")


def test_an_unknown_file_type_is_refused(tmp_path):
    (tmp_path / "w.npz").write_bytes(b"\0")
    with pytest.raises(ValueError, match=r"unknown file type '\.npz'"):
        read_state_dict(tmp_path / "w.npz")


def test_a_file_without_weights_lists_its_keys(tmp_path):
    torch.save({"epoch": 1, "optimizer": {"lr": torch.tensor(0.1), "step": 3}}, tmp_path / "opt.pth")
    with pytest.raises(ValueError, match=r"no weights found; top-level keys are \['epoch', 'optimizer'\]"):
        read_state_dict(tmp_path / "opt.pth")


def test_pickled_objects_besides_tensors_need_trust(tmp_path):
    net = nn.Linear(3, 2)
    torch.save({"args": argparse.Namespace(lr=0.1), "model": net.state_dict()}, tmp_path / "train.pth")
    with pytest.raises(ValueError, match="trusted=True"):
        read_state_dict(tmp_path / "train.pth")
    assert read_state_dict(tmp_path / "train.pth", trusted=True).keys() == net.state_dict().keys()


def test_the_report_lists_missing_unexpected_and_mismatched_keys():
    source = {"0.weight": torch.zeros(4, 3), "0.bias": torch.zeros(4), "1.weight": torch.zeros(9, 4),
              "extra.weight": torch.zeros(1)}
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 5))
    report = load_pretrained(model, source)
    assert sorted(report.loaded) == ["0.bias", "0.weight"]
    assert report.mismatched == [("1.weight", (9, 4), (5, 4))]
    assert report.missing == ["1.bias"] and report.unexpected == ["extra.weight"]
    text = str(report)
    assert "1.weight [9, 4] vs model [5, 4]" in text and "extra.weight" in text and "1.bias" in text
    assert (model[0].weight == 0).all()


def test_strict_loading_raises_with_the_report():
    with pytest.raises(RuntimeError, match=r"(?s)strict load.*not used by the model \(1\): extra"):
        load_pretrained(nn.Linear(3, 4), {"weight": torch.zeros(4, 3), "bias": torch.zeros(4),
                                           "extra": torch.zeros(1)}, strict=True)


def test_a_swin_checkpoint_loads_exactly_into_the_same_windows(tmp_path):
    source = small_swin()
    torch.save({"model": source.state_dict()}, tmp_path / "swin.pth")
    target = small_swin()
    report = load_pretrained(target, tmp_path / "swin.pth", adapt=adapt_swin, strict=True)
    assert not report.missing and not report.mismatched
    assert_same_weights(source, target)


def test_swin_tables_are_resized_bicubically_to_larger_windows(tmp_path):
    source = small_swin(window_size=3)
    torch.save(source.state_dict(), tmp_path / "swin.pth")
    target = small_swin(window_size=(6, 6, 6, 3))  # last map is 3x3: window 3 there
    report = load_pretrained(target, tmp_path / "swin.pth", adapt=adapt_swin, strict=True)
    assert not report.mismatched
    old, new = tables(source), tables(target)
    assert new["layers.0.blocks.0.attn.relative_position_bias_table"].shape == (11 * 11, 1)
    torch.testing.assert_close(new["layers.3.blocks.1.attn.relative_position_bias_table"],
                               old["layers.3.blocks.1.attn.relative_position_bias_table"])
    key = "layers.2.blocks.1.attn.relative_position_bias_table"  # 5x5 offsets -> 11x11, per head
    expected = F.interpolate(old[key].T.reshape(1, 2, 5, 5), size=(11, 11), mode="bicubic", align_corners=False)
    torch.testing.assert_close(new[key], expected.reshape(2, 121).T)
    assert_same_weights(source, target, skip=lambda k: k.endswith("relative_position_bias_table"))
    target(torch.zeros(1, 3, 96, 96))  # index buffers were rebuilt for the new windows


def test_resizing_keeps_a_constant_bias_constant_and_drops_derived_buffers():
    target = small_swin(window_size=6)
    source = {"layers.0.blocks.0.attn.relative_position_bias_table": torch.full((25, 1), 0.7),
              "layers.0.blocks.0.attn.relative_position_index": torch.zeros(9, 9, dtype=torch.long),
              "layers.0.blocks.1.attn_mask": torch.zeros(1)}
    out = resize_rel_pos_bias_tables(source, target)
    assert list(out) == ["layers.0.blocks.0.attn.relative_position_bias_table"]
    torch.testing.assert_close(out["layers.0.blocks.0.attn.relative_position_bias_table"], torch.full((121, 1), 0.7))


def test_microsofts_original_swin_layout_is_renamed_to_timms():
    source = small_swin()
    original = {}
    for key, value in source.state_dict().items():  # the original merges patches at the end of a stage
        key = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", key)
        original[key.replace("head.fc.", "head.")] = value
    original["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(9, 9, dtype=torch.long)
    assert "layers.0.downsample.reduction.weight" in original
    target = small_swin()
    load_pretrained(target, original, adapt=adapt_swin, strict=True)
    assert_same_weights(source, target)


def test_vit_position_embeddings_are_interpolated_to_a_new_grid():
    def vit(img_size):
        return VisionTransformer(img_size=img_size, patch_size=8, embed_dim=24, depth=1, num_heads=2, num_classes=3)

    source, target = vit(32), vit(48)
    report = load_pretrained(target, source.state_dict(), adapt=resize_pos_embed, strict=True)
    assert not report.mismatched
    assert target.pos_embed.shape == (1, 1 + 6 * 6, 24)
    torch.testing.assert_close(target.pos_embed[:, :1], source.pos_embed[:, :1])  # class token kept as is
    same = vit(32)
    load_pretrained(same, source.state_dict(), adapt=resize_pos_embed, strict=True)
    torch.testing.assert_close(same.pos_embed, source.pos_embed)


def test_a_checkpoint_that_fits_nothing_is_an_error_not_a_silent_no_op():
    with pytest.raises(ValueError, match=r"none of the 2 tensors of state dict fit Linear.*prefix"):
        load_pretrained(nn.Linear(3, 4), {"encoder.weight": torch.zeros(4, 3), "encoder.bias": torch.zeros(4)})
