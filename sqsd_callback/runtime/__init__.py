"""What a training run needs around the math: the recorder that notes the step's micro-batches, the processes of
a distributed run, the run's folder and checkpoint state, example identity and texts, the logs' summary, and the
run object that holds them."""
