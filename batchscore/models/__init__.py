"""What scores: the model's artifacts, the engine that turns batches into predictions, the compiled engine."""
