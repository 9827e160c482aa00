"""``python -m kvchat.cli``: the same as the ``kvchat`` command."""

from kvchat.cli import main

main()
