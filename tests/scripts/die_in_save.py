"""pretrain_galaxy.py whose checkpoint save of step 4 is SIGKILLed after the rank files are
written and before the manifest and rename (the window a real crash could hit)."""
import os
import runpy
import signal
import sys
from pathlib import Path

from galaxy.train import checkpoint

_publish = checkpoint._publish


def publish_or_die(tmp, final, manifest):
    if manifest["step"] == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    _publish(tmp, final, manifest)


checkpoint._publish = publish_or_die
sys.argv[0] = str(Path(__file__).resolve().parents[2] / "pretrain_galaxy.py")
runpy.run_path(sys.argv[0], run_name="__main__")
