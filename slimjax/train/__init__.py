"""Training: state, optimizer, pure steps, the loop and its outputs."""
