"""`python -m galaxy.planner --config C --world N ...`: the planner's command line (galaxy.app.planner)."""
from galaxy.app.planner import main

main()
