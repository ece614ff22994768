"""Stage 2, CLIP and features: loading open_clip models (and training the toy CLIP), prompts, pre-projection feature
extraction and its cache, npz import/export, extraction throughput, torchrun sharding. Reads stage 1 (data)."""
