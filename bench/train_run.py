"""One training run of a benchmark, in a process of its own: ``python bench/train_run.py ARGS``.

Runs ``recsys.train`` with ``ARGS`` (its ``run``, so that the rows come back), saves every test
user's rank per size into ``$BENCH_RANKS_FILE``, and prints one line ``BENCH-RESULT {json}``: the
rows, the run id, the best checkpoint and validation score, the epochs, each size's best
validation score, the wall time and the peak RSS. ``bench/accuracy.py``'s ``Runs`` starts it.
"""

import json
import os
import resource
import sys
import time

import numpy as np

from recsys.train import run


def main(argv: list[str]) -> None:
    start = time.perf_counter()
    result = run(argv)
    users, ranks = result["test_ranks"]
    np.savez(os.environ["BENCH_RANKS_FILE"], users=users, ranks=ranks)
    print("BENCH-RESULT " + json.dumps({
        "rows": result["rows"], "run_id": result["run_id"], "best": result.get("best"),
        "best_val": result.get("best_val"), "epochs": result.get("epochs"),
        "best_val_by_size": result.get("best_val_by_size"),
        "wall_s": time.perf_counter() - start,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


if __name__ == "__main__":
    main(sys.argv[1:])
