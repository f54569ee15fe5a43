# The two commands of the README. Both install everything they need into .venv first.
.PHONY: example test lint setup

setup:
	@bash scripts/setup.sh

# The main job on the bundled example portrait.
example: setup
	.venv/bin/dp360 reconstruct assets/astronaut.png --out runs/astronaut

# The test suite (offline, CPU).
test: setup
	.venv/bin/python -m pytest

# ruff: lint and format check (line length 120, settings in pyproject.toml).
lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
