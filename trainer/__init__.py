"""I-FAS trainer: config, model, prompt/labels, L-LM loss, data stream, DeepSpeed loop, evaluation."""
