"""Stage 5, studies on top of the pipeline (notebooks 04-08): CFR ablations and dynamics, the known-answer testbed,
toy realism, feature geometry, attribution maps, pretraining sources. Each reads stages 0-4 and writes rows."""
