"""Which package may import which: the data flows shards -> pipelines -> train -> models, and what two sides
share lives in contract/, so the loader learns a model's inputs from `contract.inputs`, never from models/."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def imported(package: str) -> dict[str, set[str]]:
    """{module file: top-level packages it imports}, from the source of every module of `package`."""
    found = {}
    for path in sorted((REPO / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(REPO))] = names
    return found


def test_pipelines_import_nothing_from_models_or_train():
    offending = {path: names & {"models", "train"} for path, names in imported("pipelines").items()}
    assert {path: names for path, names in offending.items() if names} == {}


def test_contract_imports_none_of_the_packages_it_sits_between():
    offending = {path: names & {"shards", "pipelines", "train", "models"} for path, names in imported("contract").items()}
    assert {path: names for path, names in offending.items() if names} == {}
