"""stockapp: the quickstart-style baseline that `fedcifar bench` compares against."""
