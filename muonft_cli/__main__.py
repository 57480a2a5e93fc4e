"""`python -m muonft_cli` (and `torchrun -m muonft_cli`) entry point."""

from muonft_cli.cli import app

if __name__ == "__main__":
    app()
