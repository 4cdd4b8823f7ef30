"""Command-line entry points: ``manet-train`` (``manet_kernels.cli.train``) and
``manet-explain`` (``manet_kernels.cli.explain``)."""
