"""``python -m self_reasoning_tokens {train,compare,generate} ...`` (also the ``srt`` script)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
