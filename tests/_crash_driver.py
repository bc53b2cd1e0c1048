"""A driver process for tests/test_resume.py: trains the shared Net at tp=2 on CPU ranks
with checkpoints in ``argv[1]`` every 3 steps, resuming from the last one first; prints
one JSON line per event. With ``argv[2]`` = k, it hangs after step k's summary, for the
test to SIGKILL it there. Its own local Ray, started here, dies with it."""

import json
import os
import sys
import time

import ray

import raytp
from raytp.driver.callbacks import Callback

import nets
from nets import PLAN, Net, make_batches

STEPS, EVERY = 10, 3


class Report(Callback):
    def __init__(self, hang_after: int | None):
        self.hang_after = hang_after

    def on_step(self, summary):
        print(json.dumps({"step": summary["step"], "loss": summary["loss"]}), flush=True)
        if summary["step"] == self.hang_after:
            time.sleep(600)  # the driver "crashes" here: the test kills it

    def on_checkpoint(self, path):
        print(json.dumps({"checkpoint": os.path.basename(path)}), flush=True)


def main(checkpoint_dir: str, hang_after: int | None) -> None:
    ray.cloudpickle.register_pickle_by_value(nets)
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    policy = {"checkpoint_dir": checkpoint_dir, "checkpoint_every": EVERY}
    with raytp.TPCluster(tp=2, device="cpu", **policy) as cluster:
        print(json.dumps({"rank_pids": cluster.run(lambda actor: os.getpid())}), flush=True)
        cluster.build(Net, plan=PLAN, optimizer=raytp.AdamW(lr=0.01), seed=0)
        state = cluster.resume()
        print(json.dumps({"resumed": state["checkpoint"] and os.path.basename(state["checkpoint"]),
                          "data_position": state["data_position"]}), flush=True)
        cluster.fit(make_batches(STEPS), callbacks=[Report(hang_after)], progress=False)
    ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None)
