"""Exit losses: how the exits of a multi-exit model are trained."""
