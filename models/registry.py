"""Named model configs, timm-style: each family file registers builders; `build` is the one entry point.

A config declares the tensor layout it consumes (`contract.inputs.LAYOUTS`) and the normalisation its
weights expect; `build` turns those, the frames and the image size into `model.contract`, from which
the data pipeline is configured.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from contract.inputs import IMAGENET_MEAN, IMAGENET_STD, LAYOUTS, InputContract


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    layout: str
    builder: Callable[..., nn.Module]
    defaults: dict = field(default_factory=dict)
    # The paper's own figures for this config, e.g. {"gflops": 138, "params_m": 87, "frames": 8,
    # "img_size": 224, "source": "SIFAR Table 2"}; `models.describe` prints ours beside them.
    paper: dict = field(default_factory=dict)
    mean: tuple[float, float, float] = IMAGENET_MEAN   # the normalisation the config's weights expect
    std: tuple[float, float, float] = IMAGENET_STD


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(name: str, *, family: str, layout: str, paper: dict | None = None,
                   mean: tuple[float, float, float] = IMAGENET_MEAN, std: tuple[float, float, float] = IMAGENET_STD,
                   **defaults):
    """Register `builder(num_classes, num_frames, img_size, pretrained, **options)` under `name`.

    A model of the "super" layout says which grid it tiles as `model.super_grid` (rows, cols).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"model {name!r}: layout must be one of {LAYOUTS}, got {layout!r}")

    def decorator(builder):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = ModelSpec(name, family, layout, builder, dict(defaults), dict(paper or {}),
                                    tuple(mean), tuple(std))
        return builder

    return decorator


def get_spec(name: str) -> ModelSpec:
    _load_families()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; `models.list_models()` lists the {len(_REGISTRY)} known ones") from None


def list_models(family: str | None = None) -> list[str]:
    _load_families()
    return sorted(n for n, s in _REGISTRY.items() if family is None or s.family == family)


def build(name: str, num_classes: int, num_frames: int | None = None, img_size: int | None = None,
          pretrained: str | None = None, **options) -> nn.Module:
    """Build a registered model; `pretrained` is a local checkpoint path (never a hub download).

    Frames and image size default to the config's own (its paper figures), else 8 x 224, so that
    `build("sifar_base_12_8x192", 400)` is the 192-pixel model its name promises.
    """
    spec = get_spec(name)
    num_frames = num_frames or spec.paper.get("frames", 8)
    img_size = img_size or spec.paper.get("img_size", 224)
    kwargs = {**spec.defaults, **options}
    model = spec.builder(num_classes=num_classes, num_frames=num_frames, img_size=img_size,
                         pretrained=pretrained, **kwargs)
    model.layout = getattr(model, "layout", spec.layout)
    model.num_frames = num_frames
    model.model_name = name
    model.build_record = {"name": name, "num_classes": num_classes, "num_frames": num_frames, "img_size": img_size,
                          "options": dict(options)}   # what `models.load` rebuilds from a checkpoint
    model.contract = InputContract(layout=model.layout, num_frames=num_frames, crop_size=img_size,
                                   grid=model.super_grid if model.layout == "super" else None,
                                   mean=spec.mean, std=spec.std)
    return model


# Modules of models/ that register no model.
_NOT_FAMILIES = {"registry", "describe", "layers", "saved", "convert", "formats"}


def _load_families() -> None:
    # Importing a family file registers its configs; imported lazily so `models.registry` stays cheap.
    import importlib
    import pkgutil

    import models

    for info in pkgutil.iter_modules(models.__path__):
        if info.name not in _NOT_FAMILIES and not info.name.startswith("_"):
            importlib.import_module(f"models.{info.name}")
