"""What a model is judged by: FID, IS and precision/recall (fidelity), PSNR and image grids (images),
linear probes (probe) and the report's pictures (pictures)."""
