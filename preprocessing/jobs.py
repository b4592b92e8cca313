"""Map a worker over volumes, in-process or in a pool (shared by the pipeline and the overlap search)."""

from __future__ import annotations

import sys
from typing import Sequence


def run_jobs(jobs: Sequence, worker, workers: int, desc: str = "volumes"):
    """Map ``worker`` over jobs, in-process for one worker, else with a fork/spawn pool.

    Shows progress on stderr (:func:`minigpt4.progress.progress`: a bar on a terminal, a line
    every 5 % in a log). Results keep the order of ``jobs``.
    """
    from minigpt4.progress import progress

    bar = progress(len(jobs), desc, unit="volume")
    results = []
    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                results.append(worker(job))
                bar.update(1)
            return results
        import multiprocessing as mp

        method = "fork" if "fork" in mp.get_all_start_methods() and sys.platform != "darwin" else "spawn"
        with mp.get_context(method).Pool(min(workers, len(jobs))) as pool:
            for result in pool.imap(worker, jobs, chunksize=1):  # in order, like map, but one at a time
                results.append(result)
                bar.update(1)
        return results
    finally:
        bar.close()
