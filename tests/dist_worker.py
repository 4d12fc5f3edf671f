"""Worker for tests/test_distributed.py, launched by torchrun: one JSON file of observations per rank.

Usage: torchrun --nproc_per_node=2 tests/dist_worker.py --data DATASET.zip --out DIR --num-draws N
"""

import argparse
import itertools
import json
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from torch_utils import distributed, training_stats  # noqa: E402
from training.dataset import ImageFolderDataset, InfiniteSampler  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--num-draws", type=int, required=True)
    args = parser.parse_args()

    torch.set_num_threads(1)
    distributed.excepthook_abort_all_ranks()
    distributed.init()
    rank, world = distributed.get_rank(), distributed.get_world_size()
    result = dict(rank=rank, world=world, backend=torch.distributed.get_backend(), device=str(distributed.device()))

    # Sampler: this rank's draws, with EDM's window and without it (the plain seeded permutation).
    dataset = ImageFolderDataset(args.data, use_labels=True)
    for key, window_size in [("draws", 0.5), ("draws_no_window", 0.0)]:
        sampler = InfiniteSampler(dataset, rank=rank, num_replicas=world, seed=11, window_size=window_size)
        result[key] = list(itertools.islice(iter(sampler), args.num_draws))
    result["labels_of_draws"] = [int(dataset[i][1].argmax()) for i in result["draws"]]

    # training_stats: rank-dependent values and counts, a rank-0-only report and a name reported on one rank only.
    collector = training_stats.Collector(regex=".*")
    training_stats.report("Loss/value", torch.tensor([1.0]) if rank == 0 else torch.tensor([2.0, 4.0, 6.0]))
    training_stats.report0("Progress/tick", 5.0 + rank)
    if rank == 1:
        training_stats.report("Only/rank1", 3.0)
    collector.update()
    result["stats_round1"] = collector.as_dict()

    training_stats.report("Loss/value", 10.0 * (rank + 1))
    collector.update()
    result["stats_round2"] = collector.as_dict()
    result["cumulative_loss"] = training_stats.cumulative("Loss/value")

    # Collectives used elsewhere in the project.
    result["broadcast"] = distributed.broadcast_object({"from": rank} if rank == 0 else None)
    result["all_reduce"] = distributed.all_reduce_sum_(torch.tensor([rank + 1.0])).tolist()
    distributed.barrier()

    # warn0: a warning every rank would give alike, shown by rank 0 only, attributed to warn0's caller.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        distributed.warn0("same on every rank")
    result["warn0"] = [(str(w.message), os.path.basename(w.filename)) for w in caught]

    path = os.path.join(args.out, f"rank{rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(path + ".tmp", path)
    distributed.shutdown()


if __name__ == "__main__":
    main()
