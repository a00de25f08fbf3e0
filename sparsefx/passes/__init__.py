"""Analysis passes (annotate, shape_prop, coupling, importance) compute facts and never
mutate the graph; rewrite passes (remove_channels) mutate it and say what they invalidate."""
