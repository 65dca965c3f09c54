"""Signal simulators: sine streams (and CSV replay) for training, evaluation and the demo."""
