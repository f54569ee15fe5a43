# The two commands of the README. Both install everything they need into .venv first.
.PHONY: example test setup

setup:
	@bash scripts/setup.sh

# The main job on the bundled example portrait.
example: setup
	.venv/bin/dp360 reconstruct assets/astronaut.png --out runs/astronaut

# The test suite (offline, CPU).
test: setup
	.venv/bin/python -m pytest
