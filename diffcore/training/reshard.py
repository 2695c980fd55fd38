"""Resuming a ZeRO checkpoint onto another number of processes.

ZeRO 1-3 split the optimizer state (and with 3 the weights) into one file per rank, so a checkpoint
written by N processes cannot be read by M directly. DeepSpeed's universal checkpoint is the
library's answer: ``ds_to_universal`` rewrites the shards as one file per parameter, and an engine
configured with ``checkpoint.load_universal`` re-partitions them for its own world size. The
converter reads DeepSpeed's files with ``torch.load``; here it runs with ``weights_only=True`` (the
same allow-list as a plain resume), so converting never unpickles arbitrary objects.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
from pathlib import Path

from diffcore.training.safe_loading import weights_only_loading

UNIVERSAL_TAG = "deepspeed_universal"


def needs_universal(saved_world: int, saved_stage: int, world: int, stage: int) -> bool:
    """Whether the DeepSpeed state must be re-partitioned: the world size changed under ZeRO."""
    return saved_world != world and max(saved_stage, stage) > 0


def convert(deepspeed_dir: Path, work: Path) -> Path:
    """Write the universal form of ``deepspeed_dir`` (one tag folder) under ``work``; returns ``work``."""
    from deepspeed.checkpoint import ds_to_universal

    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    args = argparse.Namespace(
        input_folder=str(deepspeed_dir),
        output_folder=str(work / UNIVERSAL_TAG),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        # diffcore's checkpoints predate the marker the converter looks for; the content is complete
        inject_missing_state=True,
    )
    chatter = io.StringIO()  # the converter prints progress bars and its arguments
    with weights_only_loading(), contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
        ds_to_universal.main(args)
    return work
