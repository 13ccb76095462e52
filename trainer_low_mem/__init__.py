"""Low-memory trainer: config, model, loop, checkpoint/resume and the host-RAM watchdog."""
