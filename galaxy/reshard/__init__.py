"""Moving shards: one description of who holds which rows and who wants them, moved point to point
between live ranks or read from files (rows); a running model moved to another plan (relayout)."""
