"""A model to and from a checkpoint file (`contract.checkpoints`): its weights, how to rebuild it, what it reads.

Training checkpoints and converted releases of the papers' authors carry the same three entries, so one
call rebuilds either: `models.load("k400_tsm_r50.pt")` needs no recipe and no registry name.
"""
from __future__ import annotations

from torch import nn

from contract import checkpoints
from contract.inputs import InputContract
from models.registry import build


def entries(model: nn.Module) -> dict:
    """The checkpoint entries that describe `model` (a plain module, built by `models.build`)."""
    return {"model": model.state_dict(), "build": dict(model.build_record), "contract": model.contract.to_dict()}


def load(source: str | dict, storage_options: dict | None = None) -> nn.Module:
    """The model a checkpoint describes, with its weights and its input contract, in eval mode.

    `source` is a checkpoint file or URL (a folder: its latest checkpoint) or an already loaded state.
    """
    state = checkpoints.load(source, storage_options) if isinstance(source, str) else source
    if "build" not in state:
        raise ValueError(f"checkpoint {source if isinstance(source, str) else '(state)'} names no model to build "
                         f"(it has no 'build' entry); load it with the recipe that trained it "
                         f"(`python -m train eval --config ...`) or convert it with `python -m models.convert`")
    record = state["build"]
    model = build(record["name"], num_classes=record["num_classes"], num_frames=record["num_frames"],
                  img_size=record["img_size"], **record["options"])
    model.load_state_dict(state["model"])
    model.contract = InputContract.from_dict(state["contract"])
    return model.eval()
