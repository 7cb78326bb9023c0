"""`python -m galaxy.memory --config_file ... --world N`: every rank's memory for a config
(galaxy.profiler.memory)."""
import sys

from galaxy.profiler.memory import main

main(sys.argv[1:])
