"""Peak host memory of one rank loading a checkpoint, measured in a fresh process.

Run as ``python tests/_load_memory.py PATH TP RANK``; prints JSON. The rank's mesh is
made of communicators that refuse every collective (loading needs none), so one
process can stand for any rank of any tp. A thread samples the process's anonymous
resident memory (``RssAnon``: the heap, not the page cache that the checkpoint's
mmap touches) every 0.2 ms while the model loads; ``VmHWM`` (peak RSS, page cache
mapped in included) is reported beside it.
"""

from __future__ import annotations

import json
import sys
import threading
import time


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class Sampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak = self.base = _status_kib("RssAnon")
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, _status_kib("RssAnon"))
            time.sleep(0.0002)


def main(path: str, tp: int, rank: int) -> dict:
    import torch

    import raytp
    from raytp.comm import Communicator

    class NoComm(Communicator):
        def __getattribute__(self, name):
            if name.startswith("_") and name[1:] in ("all_reduce", "all_gather", "reduce_scatter",
                                                     "all_to_all", "broadcast", "scatter", "all_reduce_max"):
                raise RuntimeError(f"loading issued a collective: {name}")
            return super().__getattribute__(name)

        device = torch.device("cpu")

    NoComm.__abstractmethods__ = frozenset()
    mesh = raytp.DeviceMesh.from_communicators(NoComm(rank, tp, "tp"), NoComm(0, 1, "dp"), "cpu")
    # one-time costs that are not the loading's: torch's meta-device machinery (~30 MB of
    # Python modules imported at the first meta op) and the safetensors extension
    tiny = raytp.models.BertConfig(vocab_size=8, n_layers=1, n_heads=12, d_model=12, d_ff=12, max_seq_len=4)
    raytp.models.Bert(tiny, mesh, device="meta", init=False)
    import safetensors.torch  # noqa: F401
    hwm_before = _status_kib("VmHWM")
    sampler = Sampler()
    sampler.start()
    model = raytp.models.from_pretrained(path, mesh)
    sampler.stop.set()
    sampler.join()
    sampler.peak = max(sampler.peak, _status_kib("RssAnon"))
    shard = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"tp": tp, "rank": rank, "shard_bytes": shard,
            "peak_anon_delta_bytes": (sampler.peak - sampler.base) * 1024,
            "vmhwm_delta_bytes": (_status_kib("VmHWM") - hwm_before) * 1024}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
