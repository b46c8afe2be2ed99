"""Building shards: catalog and instruction files → validated samples → WebDataset tar shards + manifest."""
