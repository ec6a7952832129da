"""What every checkpoint format shares: the file as read, the plan it implies, and a mapper that places tensors.

A format turns the authors' checkpoint into our model's state dict in three steps: `claims` recognises its keys,
`plan` says what to build (the options the keys or the file's own records imply, and the input contract its
weights were trained with), and `map` places every source tensor under our key, or drops it with a reason, or
leaves it for `models.convert` to report as unexpected. Nothing is guessed silently: a value the file does not
record comes from the registry or the command line, and the report says which.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

import torch
from torch import nn

StateDict = dict[str, torch.Tensor]


class ConversionError(ValueError):
    """A checkpoint that cannot become the requested model; the message is one line that names the fix."""


def abbrev(keys, n: int = 4) -> str:
    """The first `n` keys and how many there are in all, for one-line errors and reports."""
    keys = list(keys)
    text = ", ".join(keys[:n])
    return f"{text}, ... ({len(keys)} in all)" if len(keys) > n else text


@dataclass
class Source:
    """A checkpoint file as the authors' code saved it: its weights (wrapper prefixes stripped) and the other
    top-level entries (`arch`, `args`, `epoch`, ...) that may say how the model was built."""

    path: str
    tensors: StateDict
    records: dict = field(default_factory=dict)

    @cached_property
    def keys(self) -> set[str]:
        return set(self.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].shape)


@dataclass
class Plan:
    """What to build for a source, as build settings (registry options plus `num_frames` and `img_size`).

    `facts` are what the file proves (its shapes, its own records) and may not be contradicted; `defaults` are
    the authors' choices that their code fixes without recording them, which the user may override (`--set`);
    `required` names settings the file does not record and nothing can default, with a hint. Anything else
    comes from the registry. `mean` / `std` are the authors' normalisation where it differs from the registry's.
    """

    num_classes: int
    facts: dict = field(default_factory=dict)
    defaults: dict = field(default_factory=dict)
    required: dict = field(default_factory=dict)
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    model: str | None = None          # the registry name the file's own records point to, when they do
    notes: list[str] = field(default_factory=list)


class Format:
    """One authors' code base: recognise its checkpoints, plan the build, place the tensors."""

    name: str
    repo: str                     # where the authors' code lives (owner/name on GitHub)
    families: tuple[str, ...]     # registry families it converts into

    def claims(self, source: Source) -> bool:
        raise NotImplementedError

    def plan(self, source: Source, spec) -> Plan:
        raise NotImplementedError

    def map(self, source: Source, model: nn.Module) -> "Mapper":
        raise NotImplementedError

    def head_keys(self, model: nn.Module) -> list[str]:
        """Our keys of the classifier that `--num-classes` replaces."""
        raise NotImplementedError


class Mapper:
    """Moves source tensors to our keys and remembers where each came from and what was dropped, and why."""

    def __init__(self, source: Source):
        self.source = source
        self.left: StateDict = dict(source.tensors)   # not placed yet: unexpected unless placed or dropped
        self.out: StateDict = {}
        self.origin: dict[str, str] = {}              # our key -> the source key(s) it came from
        self.dropped: dict[str, str] = {}             # source key -> why

    def take(self, key: str) -> torch.Tensor:
        if key not in self.left:
            raise ConversionError(f"{self.source.path}: tensor {key} is missing, and the ones beside it need it; "
                                  f"is the file complete and of this format?")
        return self.left.pop(key)

    def put(self, ours: str, value: torch.Tensor, origin: str) -> None:
        self.out[ours] = value
        self.origin[ours] = origin

    def move(self, key: str, ours: str, transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        value = self.take(key)
        self.put(ours, transform(value) if transform else value, key)

    def rename(self, rules: list[tuple[str, str]]) -> None:
        """Move every remaining key that matches a rule (regex, replacement); the first matching rule wins."""
        compiled = [(re.compile(pattern), repl) for pattern, repl in rules]
        for key in list(self.left):
            for pattern, repl in compiled:
                if pattern.fullmatch(key):
                    self.move(key, pattern.sub(repl, key))
                    break

    def drop(self, key: str, why: str) -> None:
        self.left.pop(key)
        self.dropped[key] = why

    def matching(self, pattern: str) -> list[str]:
        regex = re.compile(pattern)
        return [key for key in self.left if regex.fullmatch(key)]


def check_derived_buffers(mapper: Mapper, model: nn.Module, suffixes=("relative_position_index", "attn_mask"),
                          rename: Callable[[str], str] = lambda key: key) -> None:
    """Drop the buffers Swin derives from its windows, after checking that the model derives the same ones.

    They carry no learned value, but they record the geometry the weights were trained in: a mismatch means the
    model's windows or shifts differ from the authors' network, which no renaming can fix.
    """
    differ = []
    for key in [k for k in mapper.left if k.rsplit(".", 1)[-1] in suffixes]:
        ours = rename(key)
        try:
            theirs = model.get_buffer(ours)
        except AttributeError:
            theirs = None
        value = mapper.left[key]
        if theirs is None or theirs.shape != value.shape or not torch.equal(theirs.to(value.dtype), value):
            differ.append(key)
        else:
            mapper.drop(key, "derived from the window geometry; the model derives the same one")
    if differ:
        raise ConversionError(f"{mapper.source.path}: the model's windows or shifts differ from the checkpoint's "
                              f"({abbrev(differ)} do not match the model's); pick the model whose window and "
                              f"image size match the release")
