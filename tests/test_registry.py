"""The model registry, the describe CLI and the docs table generator, exercised through the SIFAR family."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.models_table import BEGIN, END, registry_table, splice
from models import build, get_spec, list_models, register_model
from models import describe
from models.registry import _REGISTRY

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(img_size=64, embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), window_size=2)


def test_build_returns_the_named_config_with_its_layout_and_geometry():
    model = build("sifar_base_14_8x224", num_classes=7, num_frames=8, **TINY)
    assert (model.model_name, model.layout, model.num_frames, model.super_grid) == \
        ("sifar_base_14_8x224", "super", 8, (3, 3))
    assert model(torch.zeros(1, 8, 3, 64, 64)).shape == (1, 7)


def test_build_passes_options_over_the_registered_defaults():
    assert get_spec("sifar_base_7_8x224").defaults["window_size"] == 7
    model = build("sifar_base_7_8x224", num_classes=2, **{**TINY, "window_size": 3})
    assert model.stage_windows[0] == (3, 3)


def test_list_models_is_sorted_and_filters_by_family():
    sifar = list_models("sifar")
    assert sifar == sorted(sifar)
    assert {"sifar_base_7_8x224", "sifar_base_12_8x192", "sifar_base_14_8x224", "sifar_base_14_16x224",
            "sifar_base_12_8x384", "sifar_large_12_8x384", "sifar_resnet50", "sifar_resnet50_c21_11"} <= set(sifar)
    assert all(get_spec(n).family == "sifar" and get_spec(n).layout == "super" for n in sifar)
    assert set(sifar) < set(list_models())


def test_an_unknown_model_name_says_so_and_where_to_look():
    with pytest.raises(KeyError, match=r"unknown model 'sifar_huge'.*list_models\(\)"):
        build("sifar_huge", num_classes=3)


def test_a_name_cannot_be_registered_twice():
    assert get_spec("sifar_resnet50").defaults["arch"] == "resnet50"  # families are loaded
    with pytest.raises(ValueError, match="'sifar_resnet50' is registered twice"):
        register_model("sifar_resnet50", family="sifar", layout="super")(lambda **kw: None)
    assert get_spec("sifar_resnet50").defaults["arch"] == "resnet50"  # the first registration stands


def test_an_unknown_layout_is_refused():
    with pytest.raises(ValueError, match="layout must be one of"):
        register_model("test_bad_layout", family="test", layout="NTHWC")
    assert "test_bad_layout" not in _REGISTRY


def test_describe_cli_prints_parameters_and_gflops_at_the_papers_geometry():
    out = subprocess.run([sys.executable, "-m", "models.describe", "sifar_base_14_8x224"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    found = re.search(r"8 frames x 224px, layout super: ([\d.]+) M parameters, ([\d.]+) GFLOPs", out)
    assert found, out
    assert abs(float(found[1]) - 87) < 1 and abs(float(found[2]) - 147) < 2
    assert "'gflops': 147" in out


def test_describe_list_shows_family_and_layout(capsys):
    describe.main(["--list"])
    lines = capsys.readouterr().out.splitlines()
    assert any(re.fullmatch(r"sifar_resnet50_c21\s+sifar\s+super", line) for line in lines)


def test_describe_without_a_name_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        describe.main([])
    assert "give a model NAME" in capsys.readouterr().err


def test_docs_table_lists_each_config_at_its_papers_geometry():
    table = registry_table(["sifar_base_12_8x192", "sifar_resnet50"]).splitlines()
    assert re.fullmatch(r"\| sifar_base_12_8x192 \| sifar \| super \| 8x192 \| 87\.\d \| 106\.\d \|", table[2])
    assert table[3].startswith("| sifar_resnet50 | sifar | super | 8x224 |")


def test_docs_regeneration_replaces_only_the_generated_section(tmp_path):
    doc = f"# Models\n\nprose before\n\n{BEGIN}\nold table\n{END}\n\nprose after\n"
    updated = splice(doc, f"{BEGIN}\nnew table\n{END}")
    assert updated == f"# Models\n\nprose before\n\n{BEGIN}\nnew table\n{END}\n\nprose after\n"
    with pytest.raises(ValueError, match="markers of the generated section are missing"):
        splice("# no markers\n", "x", tmp_path / "models.md")


def test_the_docs_hold_the_generated_section():
    doc = (ROOT / "docs" / "models.md").read_text()
    assert doc.index(BEGIN) < doc.index("| sifar_base_14_8x224 | 8x224 | 87.4 | 87 | 147.5 | 147 |") < doc.index(END)
