"""The CUDA streams of a rank: compute, communication and data.

Kernels of the model run on the compute stream (the current stream). Collectives
that raytp issues itself (the CuPy NCCL backend) run on the communication stream,
ordered after the compute stream by events; batches are copied host->device on the
data stream. Every buffer used on a side stream is marked with ``record_stream`` so
that the caching allocator never hands it out again before the side stream is done.
On CPU there are no streams and every helper here is a no-op.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Streams:
    compute: torch.cuda.Stream | None = None
    comm: torch.cuda.Stream | None = None
    data: torch.cuda.Stream | None = None

    @classmethod
    def for_device(cls, device: torch.device) -> Streams:
        if device.type != "cuda":
            return cls()
        return cls(compute=torch.cuda.current_stream(device), comm=torch.cuda.Stream(device),
                   data=torch.cuda.Stream(device))


class StreamWork:
    """The handle of work queued on a side stream: ``wait()`` makes the current stream
    wait for it (no host synchronization)."""

    def __init__(self, stream: torch.cuda.Stream):
        self.event = torch.cuda.Event()
        self.event.record(stream)

    def wait(self) -> bool:
        torch.cuda.current_stream().wait_event(self.event)
        return True

    def is_completed(self) -> bool:
        return self.event.query()


def copy_to_device(tensor: torch.Tensor, device: torch.device, stream: torch.cuda.Stream | None):
    """Copy a CPU tensor to ``device``: on CUDA from pinned memory on ``stream`` (the data
    stream), without waiting. Returns the device tensor and the work the compute stream
    must wait for before using it (None when the copy was synchronous)."""
    if device.type != "cuda" or stream is None:
        return tensor.to(device), None
    pinned = tensor if tensor.is_pinned() else tensor.pin_memory()
    # the host allocator keeps the pinned block until the copy on ``stream`` is done
    with torch.cuda.stream(stream):
        out = pinned.to(device, non_blocking=True)
    out.record_stream(torch.cuda.current_stream(device))  # allocated on ``stream``, used on compute
    return out, StreamWork(stream)
