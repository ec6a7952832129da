"""mit-han-lab/temporal-shift-module: TSM and TSN on torchvision's ResNets (`ops/models.py`, `ops/temporal_shift.py`,
`ops/non_local.py`).

`main.py` saves {"epoch", "arch", "state_dict", "optimizer", "best_prec1"}, the `TSN` module wrapped in
DataParallel: keys `module.base_model.<torchvision ResNet key>` and the classifier `module.new_fc` (or
`base_model.fc` when trained without dropout). A shifted block wraps its first conv (`conv1.net`); the
non-local variant wraps blocks 0 and 2 of layer2 and 0, 2, 4 of layer3 (`block.` + `nl.{g.0, theta, phi.0,
W.0, W.1}`). The shift's fold, the frames and the variants are in the released file names
(`..._shift8_blockres_avg_segment8_e50_nl.pth`), which their `test_models.py` parses too.
"""
from __future__ import annotations

import re
from pathlib import Path

from torch import nn

from models.formats.base import ConversionError, Format, Mapper, Plan, Source, abbrev
from models.temporal import TemporalShift

_SHIFTED = re.compile(r"base_model\.(layer\d+\.\d+)(?:\.block)?\.conv1\.net\.weight")
_RULES = [
    (r"new_fc\.(weight|bias)", r"head.fc.\1"),
    (r"base_model\.fc\.(weight|bias)", r"head.fc.\1"),
    (r"base_model\.(layer\d+\.\d+)\.nl\.g\.0\.(.*)", r"\1.nl.g.\2"),
    (r"base_model\.(layer\d+\.\d+)\.nl\.phi\.0\.(.*)", r"\1.nl.phi.\2"),
    (r"base_model\.(layer\d+\.\d+)\.nl\.theta\.(.*)", r"\1.nl.theta.\2"),
    (r"base_model\.(layer\d+\.\d+)\.nl\.W\.0\.(.*)", r"\1.nl.out.\2"),
    (r"base_model\.(layer\d+\.\d+)\.nl\.W\.1\.(.*)", r"\1.nl.bn.\2"),
    (r"base_model\.(layer\d+\.\d+)(?:\.block)?\.conv1\.net\.(.*)", r"\1.conv1.\2"),
    (r"base_model\.(layer\d+\.\d+)\.block\.(.*)", r"\1.\2"),
    (r"base_model\.(.*)", r"\1"),
]


class TsmFormat(Format):
    name = "tsm"
    repo = "mit-han-lab/temporal-shift-module"
    families = ("cnn",)

    def claims(self, source: Source) -> bool:
        keys = source.keys
        return "base_model.conv1.weight" in keys and bool({"new_fc.weight", "base_model.fc.weight"} & keys)

    def plan(self, source: Source, spec) -> Plan:
        head = "new_fc.weight" if "new_fc.weight" in source.keys else "base_model.fc.weight"
        plan = Plan(num_classes=source.shape(head)[0])
        for pattern, what in ((r"base_model\.layer\d+\.\d+\.net\..*", "shifts whole blocks (shift_place=block)"),
                              (r"base_model\.layer2\.net\..*", "pools time before layer2 (temporal_pool)")):
            if any(re.fullmatch(pattern, key) for key in source.keys):
                raise ConversionError(f"{source.path} {what}; our TSM shifts inside the residual branch "
                                      f"(blockres) and pools differently, so it cannot be represented")
        shifted = any(_SHIFTED.fullmatch(key) for key in source.keys)
        temporal = spec.defaults.get("temporal")
        if temporal != ("tsm" if shifted else "none"):
            kind, family = ("TSM", "tsm_r<depth>") if shifted else ("TSN (nothing shifted)", "tsn_r<depth>")
            raise ConversionError(f"{source.path} is a {kind} ResNet, {spec.name} is not; pick {family}")
        plan.facts["non_local"] = any(".nl." in key for key in source.keys)
        name = Path(source.path).name
        if shifted and (fold := re.search(r"_shift(\d+)_", name)):
            plan.facts["tsm_fold_div"] = int(fold.group(1))
            plan.notes.append(f"shift fold 1/{fold.group(1)} of the channels (file name)")
        if frames := re.search(r"_segment(\d+)", name):
            plan.facts["num_frames"] = int(frames.group(1))
            plan.notes.append(f"{frames.group(1)} frames (file name)")
        return plan

    def map(self, source: Source, model: nn.Module) -> Mapper:
        theirs = {m.group(1) for key in source.keys if (m := _SHIFTED.fullmatch(key))}
        ours = {name[:-len(".temporal")] for name, module in model.named_modules()
                if isinstance(module, TemporalShift) and name.endswith(".temporal")}
        if theirs != ours:
            raise ConversionError(f"{source.path}: the checkpoint shifts other blocks than {model.model_name}: "
                                  f"only in the checkpoint: {abbrev(sorted(theirs - ours)) or 'none'}; only in the "
                                  f"model: {abbrev(sorted(ours - theirs)) or 'none'}")
        mapper = Mapper(source)
        mapper.rename(_RULES)
        return mapper

    def head_keys(self, model: nn.Module) -> list[str]:
        return ["head.fc.weight", "head.fc.bias"]


TSM = TsmFormat()
