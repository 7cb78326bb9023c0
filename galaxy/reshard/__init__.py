"""Moving shards: a running model moved to another plan in memory (relayout: live re-planning and
--elastic inference), rows sent point to point by comm.collectives.reshard_into."""
