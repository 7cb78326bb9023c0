"""infer_galaxy.py whose rank SIGKILLs itself: GALAXY_TEST_KILL "rank,request,world" kills that rank
once it has served that many requests in a run of that world (the world --elastic restarts is
smaller, so the kill happens once). The patch is made at import, so spawned ranks have it too."""
import os
import signal

from galaxy.app import infer

_serve = infer.serve


def serve(forward, batches, ctx, *rest):
    for served, result in enumerate(_serve(forward, batches, ctx, *rest), 1):
        yield result
        if os.environ.get("GALAXY_TEST_KILL") == f"{ctx.rank},{served},{ctx.world}":
            os.kill(os.getpid(), signal.SIGKILL)


infer.serve = serve

if __name__ == "__main__":
    infer.main(__doc__, "train_config/bert/galaxy/full.json")
