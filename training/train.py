"""Documented entry point: ``python -m training.train`` forwards every argument to the trainer."""
import sys

from .train_distill import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
