"""Stage 4, evaluation: append-only result rows, bootstrap statistics, tables (markdown, LaTeX, both selection
protocols, the paired comparison) and plots. Reads the methods' registry for row labels and label marks."""
