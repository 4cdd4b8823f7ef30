"""Command-line entry points: ``manet-train`` (``manet_kernels.cli.train``)."""
