"""``python -m musiclm``: the command line.

Layer: top.
"""

from musiclm.cli import main

main()
