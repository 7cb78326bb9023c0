"""infer_galaxy.py whose rank SIGKILLs itself: GALAXY_TEST_KILL "rank,request,world" kills that rank
once it has served that many requests in a run of that world (the world --elastic restarts is
smaller, so the kill happens once); GALAXY_TEST_SLOW "rank,request,factor" makes that rank's
compute `factor` times slower from that request on (galaxy.planner.profile.slow_down). The patch
is made at import, so spawned ranks have it too."""
import contextlib
import os
import signal

from galaxy.app import infer
from galaxy.planner.profile import slow_down

_serve = infer.serve


def serve(forward, batches, ctx, *rest):
    requests = _serve(forward, batches, ctx, *rest)
    for served in range(1, 1 << 62):
        with _slowed(ctx.rank, served):
            result = next(requests, None)
        if result is None:
            return
        yield result
        if os.environ.get("GALAXY_TEST_KILL") == f"{ctx.rank},{served},{ctx.world}":
            os.kill(os.getpid(), signal.SIGKILL)


def _slowed(rank, request):
    if not os.environ.get("GALAXY_TEST_SLOW"):
        return contextlib.nullcontext()
    slowed, start, factor = os.environ["GALAXY_TEST_SLOW"].split(",")
    return slow_down(rank, {int(slowed)} if request >= int(start) else set(), factor=float(factor))


infer.serve = serve

if __name__ == "__main__":
    infer.main(__doc__, "train_config/bert/galaxy/full.json")
