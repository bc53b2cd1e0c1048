"""A ``ray job submit`` entrypoint: the digits demo on the cluster the job runs in.

    ray job submit --address http://127.0.0.1:8265 --working-dir examples -- python ray_job.py

Inside a job, Ray sets RAY_ADDRESS, so ``TPCluster`` joins that cluster instead of
starting one. Exits non-zero if the held-out accuracy is under 95%.
"""

import argparse
import logging
import sys

from raytp.driver.demo import main

if __name__ == "__main__":
    # INFO shows which Ray cluster TPCluster joins ("connecting to the Ray cluster at ...")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel ranks (GPUs, or CPU ranks)")
    parser.add_argument("--epochs", type=int, default=10, help="passes over the digits' training set")
    args = parser.parse_args()
    accuracy = main(tp=args.tp, epochs=args.epochs, progress=False)
    sys.exit(0 if accuracy >= 0.95 else 1)
