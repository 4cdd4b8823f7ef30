"""The pytest-benchmark entry points (``test_bench_<op>.py``) import the bench scripts
and their harness (``utils.py``) as modules, whatever pytest's import mode."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
