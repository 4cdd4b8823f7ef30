"""``python -m manet_kernels.explain``: the ``manet-explain`` command line."""

from manet_kernels.cli.explain import main

if __name__ == "__main__":
    raise SystemExit(main())
