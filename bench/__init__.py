"""`bench throughput`: this project's data path measured against its baselines, side by side."""
