"""pretrain_galaxy.py with slow or failing optimizer steps, for the launch tests: each step
sleeps GALAXY_TEST_STEP_S seconds; rank GALAXY_TEST_FAIL_RANK raises after its first step;
GALAXY_TEST_KILL "rank,step,world": that rank SIGKILLs itself after that step in a run of that world
(the world restarted by --elastic is smaller, so the kill happens once); GALAXY_TEST_SLOW
"rank,step,factor": from that step on, every torch call of that rank takes factor times its CPU time
(galaxy.planner.profile.slow_down, a weaker device for --replan to move work from).
The patch is made at import, so the ranks a local spawn starts (which import this module as
their main module) have it too."""
import os
import signal
import time
from contextlib import nullcontext

from galaxy.app import train
from galaxy.planner.profile import slow_down
from galaxy.train.loop import Trainer

_train_step = Trainer.train_step


def slowed(self):
    """The slow-down GALAXY_TEST_SLOW asks for in the step about to run on this rank."""
    if "GALAXY_TEST_SLOW" not in os.environ:
        return nullcontext()
    rank, step, factor = map(int, os.environ["GALAXY_TEST_SLOW"].split(","))
    return slow_down(self.ctx.rank, {rank} if self.step + 1 >= step else set(), factor)


def train_step(self):
    with slowed(self):
        metrics = _train_step(self)
    time.sleep(float(os.environ.get("GALAXY_TEST_STEP_S", "0")))
    if str(self.ctx.rank) == os.environ.get("GALAXY_TEST_FAIL_RANK"):
        raise RuntimeError(f"injected failure after step {self.step}")
    if os.environ.get("GALAXY_TEST_KILL") == f"{self.ctx.rank},{self.step},{self.ctx.world}":
        os.kill(os.getpid(), signal.SIGKILL)
    return metrics


Trainer.train_step = train_step

if __name__ == "__main__":
    train.main(__doc__, "bert", "train_config/bert/galaxy/full.json")
