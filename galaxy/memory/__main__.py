"""`python -m galaxy.memory --config_file ... --world N`: every rank's memory for a config
(galaxy.app.memory)."""
from galaxy.app.memory import main

main()  # its command line: sys.argv[1:]
