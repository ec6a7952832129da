"""`LoaderConfig`: every setting of a `VideoLoader`, frozen and checked once, before an index is read.

    config = LoaderConfig.of(batch_size=32, contract=model.contract, mode="train", rank=rank, world_size=4)
    loader = VideoLoader("s3://bucket/k400", config=config)       # or VideoLoader(shards, 32, **the same keywords)

Keywords are the fields' names, plus the names of the two nested configs' fields, so a recipe's
`data.options` reads as a flat list of keys (`OPTIONS` lists them all):
  contract  `num_frames`, `crop_size`, `layout`, `grid`, `mean`, `std` set those of `contract`
            (`contract.inputs.InputContract`, what the model reads; `models.build` sets `model.contract`);
  augment   `color_jitter`, `color_jitter_prob`, `grayscale_prob`, `gaussian_blur_prob`,
            `gaussian_blur_sigma`, `rand_augment` build `augment` (`augment.Augment.of`, training only).
An unknown keyword is refused in one line naming the nearest known one.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field

from contract.inputs import InputContract, super_grid
from pipelines.augment import Augment
from pipelines.protocols import check as check_protocol
from pipelines.sampling import TSN_SCALES, eval_views, frame_indices

TRAIN_CROPS = ("scale_jitter", "tsn_multiscale", "random_resized_crop")
CONTRACT_KEYS = ("num_frames", "crop_size", "layout", "grid", "mean", "std")
AUGMENT_KEYS = ("color_jitter", "color_jitter_prob", "grayscale_prob", "gaussian_blur_prob", "gaussian_blur_sigma",
                "rand_augment")


@dataclass(frozen=True)
class LoaderConfig:
    """What a loader delivers and how it runs. Per sample, everything random is drawn on the host from
    (seed, epoch, video): see `plan.py`."""
    batch_size: int
    contract: InputContract = InputContract()
    # what each batch holds
    mode: str = "train"                          # "train": one random view per video; "eval": clips x crops each
    split: str | None = None                     # the split folder under the shards' output root
    sampling: str = "uniform"                    # "uniform" (TSN segments) or "dense" (frames `stride` apart)
    stride: int = 2
    num_clips: int = 1                           # evaluation views per video: num_clips x num_crops
    num_crops: int = 1
    train_crop: str = "scale_jitter"             # one of TRAIN_CROPS
    short_side: tuple[int, int] = (256, 320)     # scale_jitter's short-side range
    test_short_side: int | None = None           # None: the protocol's (`sampling.eval_short_side`)
    tsn_scales: tuple[float, ...] = TSN_SCALES
    flip: bool = True                            # keep False for direction-sensitive classes (SSv2)
    protocol: str = "default"                    # whose sampling and crop rules (`protocols.py`)
    augment: Augment = Augment()                 # recipe augmentations, training only
    # the epoch and this rank's part of it
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    shuffle_buffer: int = 64
    # where and how it runs
    device: str = "cpu"                          # "cpu" or "gpu"
    device_id: int = 0
    storage_options: dict | None = field(default=None, hash=False)   # fsspec options (an S3 endpoint, keys)
    readers: int = 8                             # workers that read, verify and cut (`fetch.py`)
    reader_processes: bool | None = None         # the readers are processes, else threads of this one; None:
                                                 # processes on hosts of 8 or more cores (`fetch.processes_win`)
    num_threads: int | None = None               # DALI threads per pipeline; None: the cores shared out
    num_pipelines: int | None = None             # DALI pipelines; None: 4 on the GPU, one per core (<= 4) on the CPU
    prefetch: int = 2                            # batches queued per pipeline
    max_failures: int | float = 100              # per epoch and rank: a count, or a fraction of the samples read
    verify: bool = True                          # check each video's bytes against the index's sha256
    cut_gops: bool = True                        # decode only the GOPs a view needs (`gops.py`)
    gop_reads: bool | None = None                # read only those GOPs' bytes; None: where it wins (`source.gop_reads_win`)

    def __post_init__(self):
        if self.device not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'cpu' or 'gpu', got {self.device!r}")
        if self.batch_size < 1 or self.world_size < 1:
            raise ValueError(f"batch_size and world_size must be at least 1, got {self.batch_size} and {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank={self.rank} is not a rank of world_size={self.world_size}: ranks count from 0 "
                             f"to {self.world_size - 1}")
        _check_max_failures(self.max_failures)
        if self.mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {self.mode!r}")
        if self.train_crop not in TRAIN_CROPS:
            raise ValueError(f"train_crop must be one of {TRAIN_CROPS}, got {self.train_crop!r}")
        for name in ("readers", "shuffle_buffer", "prefetch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        frame_indices(self.sampling, 1, 1, self.stride)       # a wrong sampling name or stride fails here
        check_protocol(self.protocol, self.sampling, self.train_crop if self.mode == "train" else None)
        if self.mode == "eval":
            eval_views(self.num_clips, self.num_crops, self.protocol)

    @classmethod
    def of(cls, batch_size: int, contract: InputContract | None = None, **options) -> LoaderConfig:
        """A config from keywords (`OPTIONS`): a contract's and an augmentation's fields may be given by name."""
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ValueError(unknown_option(unknown[0], "loader option"))
        contract = contract_of(contract or InputContract(), {k: options.pop(k) for k in CONTRACT_KEYS if k in options})
        augment = {k: options.pop(k) for k in AUGMENT_KEYS if k in options}
        if augment:
            options["augment"] = Augment.of(**augment)
        for key in ("short_side", "tsn_scales"):            # YAML gives lists
            if key in options:
                options[key] = tuple(options[key])
        return cls(batch_size=batch_size, contract=contract, **options)

    @property
    def views(self) -> list[tuple[int, int]]:
        """(clip, crop) of the views of one video: one in training, every clip and crop in evaluation."""
        return [(0, 0)] if self.mode == "train" else eval_views(self.num_clips, self.num_crops, self.protocol)

    @property
    def train_augment(self) -> Augment:
        """The augmentations the graph applies: none in evaluation."""
        return self.augment if self.mode == "train" else Augment()


FIELDS = tuple(f.name for f in dataclasses.fields(LoaderConfig) if f.name not in ("contract", "augment"))
OPTIONS = FIELDS + CONTRACT_KEYS + AUGMENT_KEYS


def nearest_option(key: str) -> str | None:
    """The option a mistyped `key` most likely meant, if any is close."""
    near = difflib.get_close_matches(key, OPTIONS, n=1)
    return near[0] if near else None


def unknown_option(key: str, what: str) -> str:
    """The one-line refusal of an option no field takes, naming the nearest one."""
    near = nearest_option(key)
    hint = f"did you mean {near!r}?" if near else f"the options are {', '.join(OPTIONS)}"
    return f"unknown {what} {key!r}; {hint}"


def contract_of(contract: InputContract, changes: dict) -> InputContract:
    """`contract` with the given fields changed, as a loader's keywords give them: a grid as "2x4", lists
    for mean and std; a super layout keeps the contract's grid, or takes SIFAR's rule when it is new."""
    layout = changes.get("layout", contract.layout)
    num_frames = changes.get("num_frames", contract.num_frames)
    grid = changes.get("grid", contract.grid if layout == contract.layout else None)
    if layout != "super" and grid is not None:
        raise ValueError(f"grid={grid!r} tiles super images; it goes with layout='super', not {layout!r}")
    if layout == "super":
        grid = super_grid(num_frames, grid)
    values = {**changes, "grid": grid}
    for key in ("mean", "std"):
        if key in values:
            values[key] = tuple(values[key])
    return dataclasses.replace(contract, **values)


def _check_max_failures(max_failures) -> None:
    count = isinstance(max_failures, int) and not isinstance(max_failures, bool) and max_failures >= 0
    fraction = isinstance(max_failures, float) and 0 <= max_failures <= 1
    if not (count or fraction):
        raise ValueError(f"max_failures must be a count (an int >= 0) or a fraction of the samples a rank reads per "
                         f"epoch (a float in [0, 1], e.g. 0.01), got {max_failures!r}")
