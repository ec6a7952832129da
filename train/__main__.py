"""`python -m train fit|eval ...`; see train.cli."""
from train.cli import main

main()
