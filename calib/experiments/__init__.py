"""Stage 6, experiments and entry points: the experiment runner (specs -> result rows), the CLI, the paper-profile
plan, benchmarks, the README's generated blocks, and the notebook, Colab and run_all.sh support."""
