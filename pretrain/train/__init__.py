"""The training loop, its optimizer and schedule, and the losses."""
