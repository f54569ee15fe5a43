"""`python -m cli.main` and the `dp360` script's entry point (pyproject.toml): the app is built in
cli/app.py."""

from cli.app import app, main

__all__ = ["app", "main"]

if __name__ == "__main__":
    main()
