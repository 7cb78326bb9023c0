"""A running model moved to another plan in memory (relayout); the rows it moves are described and
sent by galaxy.comm.rows, which HF loading and training checkpoints read files through too."""
