"""Pure statistics (binomial bounds, fixed-sequence testing) with no mmexit dependencies beyond errors."""
