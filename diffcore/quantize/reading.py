"""Reading safetensors tensors with plain file reads, each into memory of its own.

safetensors maps the whole file and hands out tensors that view the mapping: every page a loader
touches stays resident (and counts in the process's RSS) until the last tensor viewing the file is
gone, and a small full-precision tensor kept from it keeps the whole mapping alive. A quantised load
touches every byte once and keeps only the small quantised copy, so it reads each tensor into a
buffer of its own instead: peak memory is the quantised model plus the one tensor in flight.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

# the format's dtype names (https://github.com/huggingface/safetensors, "Format")
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def read_tensors(file: Path, keys: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(key, tensor)`` for ``keys`` of one safetensors file, in file order, each tensor read into
    its own buffer (no mapping of the file stays behind)."""
    with open(file, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
        start = 8 + size
        wanted = sorted(keys, key=lambda k: header[k]["data_offsets"][0])
        for key in wanted:
            entry = header[key]
            begin, end = entry["data_offsets"]
            dtype = DTYPES.get(entry["dtype"])
            if dtype is None:
                raise ValueError(f"{file}: tensor {key} has dtype {entry['dtype']}, which diffcore does not read")
            buffer = torch.empty(end - begin, dtype=torch.uint8)
            f.seek(start + begin)
            if f.readinto(buffer.numpy().data) != end - begin:
                raise ValueError(f"{file}: tensor {key} is cut short (a truncated file?)")
            yield key, buffer.view(dtype).reshape(entry["shape"])
