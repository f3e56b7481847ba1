"""Weight formats: the original SD single-file key map, safe file reading, strict import and export."""
