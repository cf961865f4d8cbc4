"""Training machinery that knows no model family and no data set: the loop, losses, batching,
checkpoints and resume, run folders, distributed helpers and memory accounting."""
