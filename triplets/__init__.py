"""Per-sample triplet stages, the shard sample format, input readers and inspection."""
