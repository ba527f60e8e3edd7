"""Training building blocks: loss, optimizer, metrics; the step, checkpointing and loop sit beside them."""
