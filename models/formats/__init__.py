"""The papers' authors' checkpoint layouts, one module per code base, and how to tell them apart by their keys.

| format     | the authors' code                          | our models                                  |
|------------|--------------------------------------------|---------------------------------------------|
| `sifar`    | IBM/sifar-pytorch                          | `sifar_*` (Swin and ResNet SIFAR)           |
| `ibm-ar`   | IBM/action-recognition-pytorch             | `tsn/tam/i3d/s3d_r*`, `*_inception`         |
| `tsm`      | mit-han-lab/temporal-shift-module          | `tsm_r*`, `tsn_r*`                          |
| `sifa`     | FuchenUSTC/SIFA                            | `sifa_r50_released`, `sifa_r101`, `sifa_swin_*` |
| `tokshift` | VideoNetworks/TokShift-Transformer         | `ivvit_*`                                   |
| `ivvit`    | shuki0shimizu/IV-ViT                       | `ivvit_*`                                   |
"""
from __future__ import annotations

from models.formats import ibm_ar, sifa, sifar, tsm, vit
from models.formats.base import ConversionError, Mapper, Plan, Source, abbrev

FORMATS = {f.name: f for f in (sifar.SIFAR, ibm_ar.IBM_AR, tsm.TSM, sifa.SIFA, vit.TOKSHIFT, vit.IVVIT)}


def detect(source: Source) -> str:
    """The one format whose keys the source has; an error naming the candidates when none or several fit."""
    found = [name for name, fmt in FORMATS.items() if fmt.claims(source)]
    if len(found) == 1:
        return found[0]
    sample = abbrev(sorted(source.keys), 3)
    if not found:
        raise ConversionError(f"{source.path}: no known checkpoint format has keys like {sample}; pass --format "
                              f"(one of {', '.join(FORMATS)}) if it is one of them")
    raise ConversionError(f"{source.path}: the keys fit several formats ({', '.join(found)}); pass --format")


__all__ = ["FORMATS", "ConversionError", "Mapper", "Plan", "Source", "detect"]
