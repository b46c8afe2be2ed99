"""Reading shards into batches: tar index, per-(rank, worker) epoch plans, mixing, decoding, templates, packing and the cursor."""
