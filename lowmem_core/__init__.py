"""The core every package imports: errors and the one-line CLI runner, durable writes, memory
readings and the on-disk format constants. It imports nothing else of the project."""
