"""`python -m sparseformer ...` is the same as the `sparseformer` command."""

from sparseformer.cli import main

if __name__ == "__main__":
    main()
