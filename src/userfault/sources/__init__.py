"""Page sources: where pagers get the bytes they install."""
