import sys

from .allocator import pin_malloc_thresholds
from .cli import main

# Before anything is timed: no timing may depend on what the process freed before it.
sys.exit(main(allocator=pin_malloc_thresholds()))
