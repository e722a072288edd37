"""Recipes: MEG, Hybrid SR, Preview-refine, on one framework."""
