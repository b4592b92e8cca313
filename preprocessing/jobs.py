"""Map a worker over volumes, in-process or in a pool (shared by the pipeline and the overlap search)."""

from __future__ import annotations

import sys
from typing import Sequence

from minigpt4.progress import progress


class WorkerDied(ValueError):
    """A pool worker died (killed, out of memory) instead of returning or raising."""


def run_jobs(jobs: Sequence, worker, workers: int, desc: str = "volumes", stop_when=None):
    """Map ``worker`` over jobs, in-process for one worker, else with a fork/spawn pool.

    Shows progress on stderr (:func:`minigpt4.progress.progress`: a bar on a terminal, a line
    every 5 % in a log). Results keep the order of ``jobs``. ``stop_when(result)`` true: the
    results so far are returned at once, the jobs not started are dropped (``--on-error fail``
    names a bad volume without first preparing the thousands after it).
    """
    bar = progress(len(jobs), desc, unit="volume")
    results = []
    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                results.append(worker(job))
                bar.update(1)
                if stop_when is not None and stop_when(results[-1]):
                    break
            return results
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool

        method = "fork" if "fork" in mp.get_all_start_methods() and sys.platform != "darwin" else "spawn"
        # concurrent.futures, not multiprocessing.Pool: a worker that dies (killed, out of memory)
        # breaks the pool and fails the run, where Pool would wait for its result forever
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=mp.get_context(method)) as pool:
            futures = [pool.submit(worker, job) for job in jobs]
            try:
                for job, future in zip(jobs, futures):
                    results.append(future.result())
                    bar.update(1)
                    if stop_when is not None and stop_when(results[-1]):
                        for pending in futures:
                            pending.cancel()
                        break
            except BrokenProcessPool:
                raise WorkerDied(
                    f"a worker process died while preparing {desc} (killed, e.g. out of memory) at "
                    f"{getattr(job, 'volume_name', None) or (job[0] if isinstance(job, tuple) else job)}; run again with --workers 1 to see the "
                    "volume's error, or with fewer workers") from None
            except BaseException:
                for pending in futures:
                    pending.cancel()
                raise
        return results
    finally:
        bar.close()
