"""`python -m privlm`: the same command as the `privlm` console script."""

from privlm.cli import main

main()
