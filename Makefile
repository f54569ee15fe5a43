# The two commands of the README. Both install everything they need into .venv first.
.PHONY: example test lint setup upgrade-check bench

setup:
	@bash scripts/setup.sh

# The main job on the bundled example portrait.
example: setup
	.venv/bin/dp360 reconstruct assets/astronaut.png --out runs/astronaut

# The test suite (offline, CPU): two worker processes, one thread each, a test file per worker
# (module fixtures such as the fitted field are built once).
test: setup
	.venv/bin/python -m pytest -n 2 --dist loadfile

# ruff: lint and format check (line length 120, settings in pyproject.toml); import-linter: the
# layers of .importlinter (cli > runner > stages > bottom layer; no import circles).
lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/lint-imports

# The newest versions the ranges in pyproject.toml allow, without constraints.txt, in their own
# environment; when the suite passes there, refresh constraints.txt from it.
upgrade-check:
	VENV=.venv-upgrade CONSTRAINTS= bash scripts/setup.sh
	.venv-upgrade/bin/python -m pytest -n 2 --dist loadfile

# Speed, memory and quality benchmarks (full size on a CUDA GPU; `--quick` for a CPU check);
# writes benchmarks/RESULTS.md.
bench: setup
	.venv/bin/python benchmarks/run_all.py
