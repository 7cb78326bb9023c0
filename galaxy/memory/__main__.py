"""`python -m galaxy.memory --config_file ... --world N`: every rank's memory for a config
(galaxy.app.memory)."""
import sys

from galaxy.app.memory import main

main(sys.argv[1:])
